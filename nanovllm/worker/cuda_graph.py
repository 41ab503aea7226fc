"""Decode steps replayed from CUDA graphs captured at fixed batch sizes.

A step's inputs travel in one host-to-device copy: a pinned int32 host buffer laid out exactly like the static device
buffer the graphs read (token ids, previous-step rows, positions, slots, context lengths, the decode order, sampling
temperatures, seeds and positions, block tables). Each graph then runs, with no host involvement: the gather of
tokens sampled by the previous step (from the runner's `sampled` buffer), the model, and, without tensor
parallelism, the LM head and the fused Gumbel-max sampler, which writes the new ids back into `sampled`."""
import numpy as np
import torch
from torch import nn

from nanovllm.distributed.tp import TPInfo
from nanovllm.kernels.sampling import new_workspace, sample_gumbel
from nanovllm.utils.context import Context, forward_context
from nanovllm.worker.messages import StepInput

# int32 fields, each max_bs long, then int64 fields (two int32 each), then the block tables [max_bs, W]
I32_FIELDS = ("input_ids", "prev_rows", "positions", "slot_mapping", "context_lens", "decode_order", "temperatures")
I64_FIELDS = ("seeds", "sample_positions")
PAD = {"prev_rows": -1, "slot_mapping": -1}  # padding rows: no previous-step id, no K/V write, no keys (ctx 0)


def capture_sizes(max_num_seqs: int, max_graph_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16, and the largest itself so any max_num_seqs has a graph
    (GeeeekExplorer/nano-vllm#216)."""
    largest = min(max_num_seqs, max_graph_batch)
    sizes = [s for s in (1, 2, 4, 8) if s <= largest] + list(range(16, largest + 1, 16))
    return sorted(set(sizes + [largest]))


class StepBuffers:
    """The static int32 device buffer, its typed views, and two pinned host twins (double-buffered: the host fills
    one while the previous step's copy from the other may still be queued)."""

    def __init__(self, max_bs: int, width: int, device: torch.device) -> None:
        self.max_bs, self.width = max_bs, width
        self.offsets, offset = {}, 0
        for name in I32_FIELDS:
            self.offsets[name], offset = offset, offset + max_bs
        offset += offset % 2  # int64 fields 8-byte aligned
        for name in I64_FIELDS:
            self.offsets[name], offset = offset, offset + 2 * max_bs
        self.tables_offset, self.size = offset, offset + max_bs * width
        self.device = torch.zeros(self.size, dtype=torch.int32, device=device)
        self.hosts = [torch.zeros(self.size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.turn = 0
        self.views = self.typed(self.device)
        self.views["block_tables"] = self.device[self.tables_offset:].view(max_bs, width)  # [max_bs * W] -> [max_bs, W]

    def typed(self, buf: torch.Tensor | np.ndarray) -> dict:
        views = {name: buf[self.offsets[name]:self.offsets[name] + self.max_bs] for name in I32_FIELDS}
        views["temperatures"] = views["temperatures"].view(torch.float32 if isinstance(buf, torch.Tensor)
                                                          else np.float32)
        for name in I64_FIELDS:
            part = buf[self.offsets[name]:self.offsets[name] + 2 * self.max_bs]
            views[name] = part.view(torch.int64 if isinstance(buf, torch.Tensor) else np.int64)
        return views

    def upload(self, step: StepInput, graph_bs: int) -> None:
        """Write the step (padded to graph_bs rows) into the next host buffer and copy it to the device."""
        host = self.hosts[self.turn]
        self.turn ^= 1
        arr = host.numpy()
        views = self.typed(arr)
        bs, s = step.num_seqs, step.sampling
        fields = {"input_ids": step.input_ids, "positions": step.positions, "slot_mapping": step.slot_mapping,
                  "context_lens": step.context_lens, "prev_rows": step.prev_rows,
                  "temperatures": s.temperatures if s else None, "seeds": s.seeds if s else None,
                  "sample_positions": s.positions if s else None}
        for name, value in fields.items():
            views[name][:bs] = PAD.get(name, 0) if value is None else value
            views[name][bs:graph_bs] = PAD.get(name, 0)
        order = views["decode_order"]  # a permutation of the graph's rows: padding rows (no keys) last
        order[:bs] = np.arange(bs) if step.decode_order is None else step.decode_order
        order[bs:graph_bs] = np.arange(bs, graph_bs)
        table = step.block_tables
        tables = arr[self.tables_offset:self.tables_offset + bs * self.width].reshape(bs, self.width)
        tables[:, :table.shape[1]] = table
        n = self.tables_offset + bs * self.width
        self.device[:n].copy_(host[:n], non_blocking=True)


class CudaGraphRunner:
    def __init__(self, model: nn.Module, sizes: list[int], max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, sampled: torch.Tensor, tp: TPInfo) -> None:
        """Block tables are captured max_blocks_per_seq wide, so sequences up to max_model_len replay
        (GeeeekExplorer/nano-vllm#190). sampled: the runner's [max_num_seqs] int64 buffer of the latest step's ids.
        Without tensor parallelism the graphs include the LM head and the sampler."""
        self.model = model
        self.sizes = sizes
        self.sampled = sampled
        self.with_head = tp.size == 1
        self.buffers = StepBuffers(sizes[-1], max_blocks_per_seq, device)
        self.hidden = torch.zeros(sizes[-1], hidden_size, dtype=dtype, device=device)
        self.sampler_workspace = new_workspace(sizes[-1], device)  # every graph's sampler folds its chunks here
        self.logits: dict[int, torch.Tensor] = {}  # per graph: its logits (graph pool: valid until the next replay)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._capture_all()

    def _context(self, bs: int) -> Context:
        v = self.buffers.views
        return Context(is_prefill=False, slot_mapping=v["slot_mapping"][:bs], context_lens=v["context_lens"][:bs],
                       decode_order=v["decode_order"][:bs], block_tables=v["block_tables"][:bs])

    def _run(self, bs: int) -> torch.Tensor | None:
        """The captured work: gather pending ids, the model, and (without TP) LM head + sampler."""
        v = self.buffers.views
        prev = v["prev_rows"][:bs]
        input_ids = torch.where(prev >= 0, self.sampled[prev.clamp(min=0).long()], v["input_ids"][:bs])
        self.hidden[:bs] = self.model(input_ids, v["positions"][:bs])
        if not self.with_head:
            return None
        logits = self.model.compute_logits(self.hidden[:bs])
        sample_gumbel(logits, v["temperatures"][:bs], v["seeds"][:bs], v["sample_positions"][:bs],
                      out=self.sampled[:bs], workspace=self.sampler_workspace)
        return logits

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.buffers.views["context_lens"].fill_(1)  # warm-up forwards read one (unwritten) slot of block 0
        self.buffers.views["prev_rows"].fill_(-1)
        self.buffers.views["decode_order"].copy_(torch.arange(self.buffers.max_bs))  # [:bs] is every graph's order
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with forward_context(self._context(bs)):
                self._run(bs)  # warm-up (compiles kernels outside the capture)
                with torch.cuda.graph(graph, self.pool):
                    logits = self._run(bs)
            if logits is not None:
                self.logits[bs] = logits
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        self.buffers.views["context_lens"].zero_()

    def fits(self, step: StepInput) -> bool:
        return step.num_seqs <= self.sizes[-1] and step.block_tables.shape[1] <= self.buffers.width

    def replay(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, hidden], logits [B, V] or None under TP); without TP `sampled[:B]` holds the ids."""
        bs = step.num_seqs
        graph_bs = next(s for s in self.sizes if s >= bs)
        self.buffers.upload(step, graph_bs)
        self.graphs[graph_bs].replay()
        logits = self.logits.get(graph_bs)
        return self.hidden[:bs], None if logits is None else logits[:bs]

    def release(self) -> None:
        self.graphs.clear()
        self.logits.clear()
        self.pool = None
