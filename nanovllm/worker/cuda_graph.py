"""Decode steps replayed from CUDA graphs captured at fixed batch sizes; inputs are copied into static buffers."""
import torch
from torch import nn

from nanovllm.utils.context import Context, forward_context


def capture_sizes(max_num_seqs: int, max_graph_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16, and the largest itself so any max_num_seqs has a graph
    (GeeeekExplorer/nano-vllm#216)."""
    largest = min(max_num_seqs, max_graph_batch)
    sizes = [s for s in (1, 2, 4, 8) if s <= largest] + list(range(16, largest + 1, 16))
    return sorted(set(sizes + [largest]))


class CudaGraphRunner:
    def __init__(self, model: nn.Module, sizes: list[int], max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        """Block tables are captured max_blocks_per_seq wide, so sequences up to max_model_len replay
        (GeeeekExplorer/nano-vllm#190)."""
        self.model = model
        self.sizes = sizes
        max_bs = sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.outputs = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._capture_all()

    def _context(self, bs: int) -> Context:
        return Context(is_prefill=False, slot_mapping=self.slot_mapping[:bs], context_lens=self.context_lens[:bs],
                       block_tables=self.block_tables[:bs])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.context_lens.fill_(1)  # warm-up forwards read one (unwritten) slot of block 0
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with forward_context(self._context(bs)):
                self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])  # warm-up
                with torch.cuda.graph(graph, self.pool):
                    self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        self.context_lens.zero_()

    def fits(self, bs: int, context: Context) -> bool:
        return bs <= self.sizes[-1] and context.block_tables.shape[1] <= self.block_tables.shape[1]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, context: Context) -> torch.Tensor:
        bs = input_ids.shape[0]
        graph_bs = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs] = input_ids
        self.positions[:bs] = positions
        self.slot_mapping[:graph_bs].fill_(-1)
        self.slot_mapping[:bs] = context.slot_mapping
        self.context_lens[:graph_bs].zero_()
        self.context_lens[:bs] = context.context_lens
        table = context.block_tables
        self.block_tables[:bs, :table.shape[1]] = table
        self.graphs[graph_bs].replay()
        return self.outputs[:bs]

    def release(self) -> None:
        self.graphs.clear()
        self.pool = None
