"""Runs the model on one tensor-parallel rank. Rank 0 drives: it sends each call to the workers over
shared memory (woken through a pipe per worker), runs its own shard, and alone samples."""
import os
import signal
import socket
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import Config, head_dim_of
from nanovllm.engine.cuda_graph import CudaGraphRunner
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.shm_channel import ShmChannel, channel_size
from nanovllm.layers.sampler import Sampler, SamplingTensors
from nanovllm.layers.sampling_rng import seed_to_int64
from nanovllm.models import MODEL_REGISTRY
from nanovllm.utils.context import forward_context
from nanovllm.utils.loader import load_model

CPU_KV_CACHE_BYTES = 512 << 20  # default KV budget on CPU when num_kvcache_blocks is not given
CPU_MAX_BLOCKS = 8192
# A collective that waits longer than this raises instead of hanging. Gloo notices a dead peer at once (closed
# socket); NCCL does not: a rank blocked on a dead peer waits this long, then the NCCL watchdog aborts the
# communicator and (TORCH_NCCL_ASYNC_ERROR_HANDLING's default) tears the process down. Long enough for the
# slowest lock-step phase (first-step compilation, CUDA-graph capture).
DIST_TIMEOUT_S = 180
MAX_ERROR_CHARS = 20_000  # worker tracebacks sent to rank 0 are cut to their last this many characters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelRunner:
    def __init__(self, config: Config, rank: int, port: int, shm_name: str,
                 conns: list[Connection] | Connection | None = None) -> None:
        """conns: rank 0, one pipe end per worker (rank order); a worker, its end of that pipe."""
        self.config = config
        self.rank = rank
        self.world_size = config.tensor_parallel_size
        self.block_size = config.kvcache_block_size
        self.conns = conns
        self.in_flight = False  # rank 0: workers got a command whose collectives rank 0 has not finished
        self.device = torch.device("cuda", rank) if config.device == "cuda" else torch.device("cpu")
        self._init_distributed(port)
        self._build_model()
        self.sampler = Sampler()
        self.kv_cache = torch.tensor([])
        self.num_kvcache_blocks = self._size_kv_cache()
        self._allocate_kv_cache(self.num_kvcache_blocks)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = CudaGraphRunner(self)
        self.channel = None
        if self.world_size > 1:
            size = channel_size(config.max_num_batched_tokens, config.max_num_seqs, self.max_blocks_per_seq)
            if rank == 0:
                self.channel = ShmChannel(shm_name, size, create=True)
            dist.barrier()
            if rank > 0:
                self.channel = ShmChannel(shm_name)
                self.loop()

    # -- setup --------------------------------------------------------------------------------------------
    def _init_distributed(self, port: int) -> None:
        if self.world_size == 1:
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=self.world_size,
                                rank=self.rank, device_id=self.device if backend == "nccl" else None,
                                timeout=timedelta(seconds=DIST_TIMEOUT_S))

    def _build_model(self) -> None:
        config = self.config
        hf_config = config.hf_config
        arch = next(a for a in hf_config.architectures if a in MODEL_REGISTRY)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = MODEL_REGISTRY[arch](hf_config, config.attention_backend)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)

    @property
    def max_blocks_per_seq(self) -> int:
        return (self.config.max_model_len + self.block_size - 1) // self.block_size

    def _kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """[k/v, layer, block, offset in block, kv head (this rank's), head dim]."""
        hf = self.config.hf_config
        return (2, hf.num_hidden_layers, num_blocks, self.block_size, hf.num_key_value_heads // self.world_size,
                head_dim_of(hf))

    def _block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.config.torch_dtype).element_size()
        return int(np.prod(self._kv_cache_shape(1))) * itemsize

    def _size_kv_cache(self) -> int:
        if self.config.num_kvcache_blocks > 0:
            return self.config.num_kvcache_blocks
        if self.device.type == "cpu":
            return max(min(CPU_KV_CACHE_BYTES // self._block_bytes(), CPU_MAX_BLOCKS), self.max_blocks_per_seq)
        num_blocks = self._size_kv_cache_cuda()
        if self.world_size > 1:  # every rank must agree on the pool size
            t = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            num_blocks = int(t.item())
        return num_blocks

    def _size_kv_cache_cuda(self) -> int:
        """Blocks that fit in gpu_memory_utilization of the GPU after weights and the activation peak of a
        full-budget prefill (measured by a warm-up pass over a temporary cache)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seqs = self._warmup_seqs()
        warm_blocks = sum(len(s.block_table) for s in seqs)
        self._allocate_kv_cache(warm_blocks)
        self.run_model(*self.prepare_prefill(seqs), is_prefill=True)
        torch.cuda.synchronize()
        activation_peak = torch.cuda.max_memory_allocated() - base - warm_blocks * self._block_bytes()
        self._free_kv_cache()
        free, total = torch.cuda.mem_get_info()
        budget = total * self.config.gpu_memory_utilization - (total - free) - max(activation_peak, 0)
        num_blocks = int(budget // self._block_bytes())
        if num_blocks < 1:
            raise RuntimeError(f"no room for even one KV-cache block on {self.device}: the model and activations "
                               f"use {(total - free) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB at "
                               f"gpu_memory_utilization={self.config.gpu_memory_utilization}; raise it, lower "
                               "max_num_batched_tokens, or free GPU memory")
        return num_blocks

    def _warmup_seqs(self) -> list[Sequence]:
        c = self.config
        seq_len = min(c.max_model_len, c.max_num_batched_tokens)
        num_seqs = max(1, min(c.max_num_batched_tokens // seq_len, c.max_num_seqs))
        seqs, next_block = [], 0
        for _ in range(num_seqs):
            seq = Sequence([0] * seq_len, block_size=self.block_size)
            seq.num_scheduled_tokens = seq_len
            seq.block_table = list(range(next_block, next_block + seq.num_blocks))
            next_block += seq.num_blocks
            seqs.append(seq)
        return seqs

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = torch.empty(self._kv_cache_shape(num_blocks), dtype=self.config.torch_dtype,
                                    device=self.device)
        for i, attn in enumerate(self.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def _free_kv_cache(self) -> None:
        for attn in self.attention_layers():
            attn.k_cache = attn.v_cache = torch.tensor([])
        self.kv_cache = torch.tensor([])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def attention_layers(self) -> list:
        from nanovllm.layers.attention import Attention
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    # -- rank 0 <-> workers ---------------------------------------------------------------------------------
    def loop(self) -> None:
        """Worker: run each command rank 0 announces (one byte on the pipe) until "exit". EOFError when rank 0
        is gone."""
        while True:
            self.conns.recv_bytes()
            method, args = self.channel.read()
            getattr(self, method)(*args)
            if method == "exit":
                break

    def call(self, method: str, *args):
        """Run method on every rank (rank 0 included). A pipe to a dead worker raises at once (BrokenPipeError),
        unlike a multiprocessing.Event, whose set() waits forever for a killed waiter. Every method called this
        way must run a collective, or rank 0 could overwrite the channel before a worker has read it."""
        if self.channel is None or self.rank != 0:
            return getattr(self, method)(*args)
        self.channel.write(method, *args)  # may raise: nothing was sent yet
        self.in_flight = True  # an exception from here on may leave the workers inside a collective
        for conn in self.conns:
            conn.send_bytes(b"\x01")
        result = getattr(self, method)(*args)
        self.in_flight = False
        return result

    def inject_fault_for_test(self, rank: int, steps: int = 0, kill: bool = False) -> None:
        """Test hook (the only one): `call("inject_fault_for_test", rank, steps, kill)` makes rank `rank` raise
        (or SIGKILL itself) at the start of its (steps + 1)-th next `run`, before that step's collectives."""
        dist.barrier()  # rank 0 must not overwrite the channel before every worker has read this command
        if self.rank != rank:
            return
        run, left = self.run, [steps]

        def failing_run(seqs: list[Sequence], is_prefill: bool) -> list[int] | None:
            if left[0] > 0:
                left[0] -= 1
                return run(seqs, is_prefill)
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"fault injected for a test on rank {rank}")
        self.run = failing_run

    def exit(self, collective: bool = True) -> None:
        """Free the cache, close (rank 0: unlink) the channel, destroy the process group. collective=False
        skips the barrier, for rank 0 cleaning up after a dead worker. Safe to repeat after a failed try."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        if self.model is not None:
            self._free_kv_cache()
        self.model = self.sampler = None  # drop the weights even while the engine object lives on
        if self.world_size > 1:
            if collective:
                dist.barrier()
            if self.channel is not None:
                self.channel.close()
            if dist.is_initialized():
                dist.destroy_process_group()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # -- one step -------------------------------------------------------------------------------------------
    def to_device(self, data, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(data), dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @staticmethod
    def fill_block_tables(seqs: list[Sequence], table: np.ndarray) -> None:
        """Row i of table (pre-filled with -1, width >= every block table) = seqs[i].block_table."""
        for i, seq in enumerate(seqs):
            table[i, :len(seq.block_table)] = seq.block_table

    def block_tables_tensor(self, seqs: list[Sequence]) -> torch.Tensor:
        table = np.full((len(seqs), max(len(seq.block_table) for seq in seqs)), -1, dtype=np.int32)
        self.fill_block_tables(seqs, table)
        return self.to_device(table, torch.int32)

    def slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        table = np.asarray(seq.block_table, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        input_ids, positions, slot_mapping = [], [], []
        cu_seqlens_q, cu_seqlens_k = [0], [0]
        for seq in seqs:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            input_ids.extend(seq.scheduled_token_ids())
            positions.append(np.arange(start, end))
            slot_mapping.append(self.slots(seq, start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            cu_seqlens_k.append(cu_seqlens_k[-1] + end)  # keys run to the chunk's end (#212)
        context = dict(
            is_prefill=True,
            cu_seqlens_q=self.to_device(cu_seqlens_q, torch.int32),
            cu_seqlens_k=self.to_device(cu_seqlens_k, torch.int32),
            max_seqlen_q=int(np.diff(cu_seqlens_q).max()),
            max_seqlen_k=int(np.diff(cu_seqlens_k).max()),
            slot_mapping=self.to_device(np.concatenate(slot_mapping), torch.int32),
            block_tables=self.block_tables_tensor(seqs))
        return (self.to_device(input_ids, torch.int64), self.to_device(np.concatenate(positions), torch.int64),
                context)

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One token per sequence: its last token at position len - 1. All int32 fields travel to the device
        in one copy: [input_ids | positions | slot_mapping | context_lens | block_tables (row-major)]."""
        n, bs = len(seqs), self.block_size
        width = max(len(seq.block_table) for seq in seqs)
        host = np.full(4 * n + n * width, -1, dtype=np.int32)
        fields = host[:4 * n].reshape(4, n)  # [4, n] views: ids, positions, slots, context lens
        fields[0] = [seq.last_token for seq in seqs]
        fields[3] = [seq.num_tokens for seq in seqs]
        fields[1] = fields[3] - 1
        tables = host[4 * n:].reshape(n, width)
        self.fill_block_tables(seqs, tables)
        fields[2] = tables[np.arange(n), fields[1] // bs] * bs + fields[1] % bs
        dev = self.to_device(host, torch.int32)
        context = dict(is_prefill=False, slot_mapping=dev[2 * n:3 * n], context_lens=dev[3 * n:4 * n],
                       block_tables=dev[4 * n:].view(n, width))
        return dev[:n], dev[n:2 * n], context

    def prepare_sample(self, seqs: list[Sequence]) -> SamplingTensors:
        """Per-row sampling parameters as tensors, on rank 0 only (workers' Sequences carry no
        sampling_params); the rarely used ones are built only when some sampled row needs them."""
        params = [seq.sampling_params for seq in seqs]
        sampled = [p for p in params if p.temperature > 0]
        floats = self.to_device([[p.temperature for p in params], [p.top_p for p in params],
                                 [p.min_p for p in params]], torch.float32)
        use_sort = any(p.top_k > 0 or p.top_p < 1 for p in sampled)
        seeded = [(i, seed_to_int64(p.seed), len(seq)) for i, (seq, p) in enumerate(zip(seqs, params))
                  if p.seed is not None and p.temperature > 0]  # position: index of the token sampled
        banned = [(i, t) for i, seq in enumerate(seqs) for t in self.banned_tokens(seq)]
        return SamplingTensors(
            temperatures=floats[0],
            top_k=self.to_device([p.top_k for p in params], torch.int64) if use_sort else None,
            top_p=floats[1] if use_sort else None,
            min_p=floats[2] if any(p.min_p > 0 for p in sampled) else None,
            seeds=self.index_rows(seeded), banned=self.index_rows(banned),
            all_greedy=not sampled, all_seeded=len(seeded) == len(sampled))

    def banned_tokens(self, seq: Sequence) -> list[int]:
        """Token ids seq may not sample yet: EOS (unless ignore_eos) and stop_token_ids before min_tokens."""
        sp = seq.sampling_params
        if seq.num_completion_tokens >= sp.min_tokens:
            return []
        eos = [self.config.eos] if not sp.ignore_eos and self.config.eos >= 0 else []
        return sp.stop_token_ids + eos

    def index_rows(self, rows: list[tuple[int, ...]]) -> torch.Tensor | None:
        """A list of equal-length int tuples as a [fields, len] int64 tensor, or None when empty."""
        if not rows:
            return None
        return self.to_device(np.ascontiguousarray(np.array(rows, dtype=np.int64).T), torch.int64)

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, context: dict,
                  is_prefill: bool) -> torch.Tensor | None:
        if not is_prefill and self.graphs is not None and self.graphs.fits(input_ids.shape[0], context):
            return self.model.compute_logits(self.graphs.replay(input_ids, positions, context))
        with forward_context(**context):
            return self.model.compute_logits(self.model(input_ids, positions))

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int] | None:
        """One step for the scheduled sequences; rank 0 returns one sampled token id per sequence."""
        prepared = self.prepare_prefill(seqs) if is_prefill else self.prepare_decode(seqs)
        sampling = self.prepare_sample(seqs) if self.rank == 0 else None
        logits = self.run_model(*prepared, is_prefill=is_prefill)
        if self.rank != 0:
            return None
        return self.sampler(logits, sampling).tolist()


def run_worker(config: Config, rank: int, port: int, shm_name: str, conn: Connection) -> None:
    """Worker process entry. On an exception, send its traceback to rank 0 and exit at once (os._exit), so
    rank 0's pending collectives fail on the closed connection instead of waiting; exit quietly when rank 0
    is gone (EOF on the pipe)."""
    try:
        ModelRunner(config, rank, port, shm_name, conn)
    except EOFError:
        os._exit(0)
    except BaseException:
        try:
            conn.send((time.time(), rank, traceback.format_exc()[-MAX_ERROR_CHARS:]))
        except OSError:
            pass
        os._exit(1)
