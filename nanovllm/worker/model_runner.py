"""One tensor-parallel rank: the model shard, its KV cache and CUDA graphs, executing StepInputs.

Rank 0's runner (built with tp=None) also starts the other ranks (distributed/workers.py) and sends them each step
before running its own shard; only rank 0 samples, and the sampled ids are broadcast to the workers on the device,
where the next step reads them without a round trip through the host."""
import pickle
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nanovllm.config import Config
from nanovllm.distributed.tp import TPInfo
from nanovllm.distributed.workers import WorkerGroup
from nanovllm.kernels import sampling
from nanovllm.layers.attention import make_backend
from nanovllm.layers.sampler import Sampler, SamplingTensors, compute_logprobs
from nanovllm.models import model_class
from nanovllm.utils.context import forward_context
from nanovllm.utils.loader import load_model
from nanovllm.worker import kv_cache
from nanovllm.worker.cuda_graph import CudaGraphRunner, capture_sizes
from nanovllm.worker.inputs import prepare
from nanovllm.worker.messages import SamplingInput, Shutdown, StepInput


class SampledIds:
    """One step's sampled token ids (and logprobs, for rows that asked) on their way to the host: non-blocking
    copies and an event on CUDA, read one step later."""

    def __init__(self, ids: torch.Tensor, host: torch.Tensor | None,
                 logprobs: tuple[torch.Tensor, ...] | None = None, logprob_rows: np.ndarray | None = None) -> None:
        self.event = None
        self.logprob_rows = logprob_rows
        if host is None:  # CPU: ids is a view of the runner's buffer, which the next step overwrites
            self.host, self.logprobs = ids.clone(), logprobs
            return
        self.host = host[:ids.shape[0]]
        self.host.copy_(ids, non_blocking=True)
        self.logprobs = None if logprobs is None else tuple(pinned_copy(t) for t in logprobs)
        self.event = torch.cuda.Event()
        self.event.record()

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def logprob_entries(self) -> dict[int, dict[int, float]]:
        """row -> {token id: logprob} holding the sampled token's and the top-k tokens' (call after tolist)."""
        if self.logprobs is None:
            return {}
        sampled = self.host.tolist()
        chosen, top_ids, top_lp = (t.tolist() for t in self.logprobs)
        entries = {}
        for i, row in enumerate(self.logprob_rows.tolist()):
            entry = dict(zip(top_ids[i], top_lp[i], strict=True))
            entry[sampled[row]] = chosen[i]
            entries[row] = entry
        return entries


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class ModelRunner:
    def __init__(self, config: Config, tp: TPInfo | None = None) -> None:
        """tp=None: rank 0 of the engine, which starts the workers when tensor_parallel_size > 1."""
        self.config = config
        self.workers: WorkerGroup | None = None
        self.owns_process_group = False
        self.model: nn.Module | None = None
        self.kv_cache: kv_cache.KVCache | None = None
        self.graphs: CudaGraphRunner | None = None
        self.hooks: list = []  # callables run at the start of each step (InstallHook; tests inject faults so)
        self.sampled: torch.Tensor | None = None  # [max_num_seqs] int64: the latest step's ids, on the device
        self.tp = tp or TPInfo()
        self.device = torch.device("cuda", self.tp.rank) if config.device == "cuda" else torch.device("cpu")
        try:
            if tp is None and config.tensor_parallel_size > 1:
                self.workers = WorkerGroup(config, channel_capacity(config))
                self.tp = self.workers.init_tp()
                self.owns_process_group = True
            self._build()
        except BaseException as e:
            self._fail_start(e)

    # -- start-up ---------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        config = self.config
        self.model = build_model(config, self.tp, self.device)
        self.sampler = Sampler() if self.tp.is_first else None
        self.sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        self.spec = kv_cache.KVCacheSpec.from_config(config)
        self.num_kvcache_blocks = self._size_kv_cache()
        self.kv_cache = kv_cache.allocate(self.spec, self.num_kvcache_blocks, self.device)
        kv_cache.bind(self.model, self.kv_cache)
        if self.device.type == "cuda":
            self.host_ids = [torch.empty(config.max_num_seqs, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self.steps = 0
            if self.tp.is_first:  # compile every sampler variant now, not inside a timed step
                sampling.warmup(config.hf_config.vocab_size, config.max_num_seqs, config.torch_dtype, self.device)
            if not config.enforce_eager:
                self.graphs = CudaGraphRunner(
                    self.model, capture_sizes(config.max_num_seqs, config.max_cuda_graph_batch_size),
                    config.max_blocks_per_seq, config.hf_config.hidden_size, config.torch_dtype, self.device,
                    self.sampled, self.tp)

    def _fail_start(self, error: BaseException) -> None:
        """Clean up a failed start; prefer a worker's own exception (e.g. a bad checkpoint) over the broken
        collective it left rank 0 in."""
        worker_error = None
        if self.workers is not None:
            if isinstance(error, Exception) and self.workers.failure is None:
                self.workers.mark_failed(error)
            worker_error = self.workers.worker_exception()
        self.exit(graceful=False)
        if isinstance(worker_error, Exception) and not isinstance(error, (ValueError, FileNotFoundError)):
            raise worker_error from error
        raise error

    def _size_kv_cache(self) -> int:
        config = self.config
        if config.num_kvcache_blocks > 0:
            kv_cache.check_fits(self.spec, config.num_kvcache_blocks, self.device)
            return config.num_kvcache_blocks
        if self.device.type == "cpu":
            return kv_cache.cpu_num_blocks(self.spec, config)
        num_blocks = kv_cache.cuda_num_blocks(self.spec, config, self._activation_peak(), self.device)
        if self.tp.size > 1:  # every rank must agree on the pool size
            t = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.group)
            num_blocks = int(t.item())
        return num_blocks

    def _activation_peak(self) -> int:
        """Bytes a full-budget prefill needs beyond weights and its own KV blocks (measured on a temporary cache)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        step = warmup_step(self.config)
        num_blocks = int(step.block_tables.max()) + 1
        cache = kv_cache.allocate(self.spec, num_blocks, self.device)
        kv_cache.bind(self.model, cache)
        self.model.compute_logits(self._forward(step))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - num_blocks * self.spec.block_bytes
        kv_cache.bind(self.model, None)
        del cache
        torch.cuda.empty_cache()
        return peak

    # -- steps ------------------------------------------------------------------------------------------------------
    def run(self, step: StepInput) -> SampledIds:
        """Rank 0: send the step to the workers, run this rank's shard; the sampled ids come back asynchronously."""
        if self.workers is None:
            return self.execute(step)
        self.workers.send(replace(step, sampling=None))
        result = self.execute(step)
        self.workers.in_flight = False
        return result

    @torch.inference_mode()
    def execute(self, step: StepInput) -> SampledIds | None:
        """Run one step on this rank; rank 0 samples into `sampled` and returns the ids on their way to the host."""
        for hook in self.hooks:
            hook(self, step)
        b = step.num_seqs
        params = sampling_tensors(step.sampling, self.device) if self.tp.is_first else None
        logits = None
        if not step.is_prefill and self.graphs is not None and self.graphs.fits(step):
            hidden, logits = self.graphs.replay(step)  # without TP: sampled[:b] already holds the fast-path ids
        else:
            hidden = self._forward(step)
        sampled_in_graph = logits is not None
        if logits is None:
            logits = self.model.compute_logits(hidden)  # [B, vocab] on rank 0 (gathered under TP), None elsewhere
        logprobs = None
        if self.tp.is_first:
            if not (sampled_in_graph and params.fast):  # filters, bans, or no graph: sample here
                self.sampler(logits, params, out=self.sampled[:b])
            if params.logprob_rows is not None:
                logprobs = compute_logprobs(logits, params, self.sampled[:b])
        self.tp.broadcast_from_first(self.sampled[:b])
        if not self.tp.is_first:
            return None
        host = None
        if self.device.type == "cuda":
            host = self.host_ids[self.steps % 2]  # the step before last has been read back: its buffer is free
            self.steps += 1
        return SampledIds(self.sampled[:b], host, logprobs, step.sampling.logprob_rows)

    def _forward(self, step: StepInput) -> torch.Tensor:
        """Eager forward; hidden states of each sequence's last position (prefill) or of each sequence (decode),
        ready for the LM head (which reads the same context to pick prefill positions)."""
        input_ids, positions, context = prepare(step, self.device, self.sampled)
        with forward_context(context):
            hidden = self.model(input_ids, positions)
            if step.is_prefill:
                hidden = hidden[context.cu_seqlens_q[1:].long() - 1]  # [B, hidden]: last position of each sequence
        return hidden

    # -- shutdown ---------------------------------------------------------------------------------------------------
    def exit(self, graceful: bool = True) -> None:
        """Free graphs, cache and weights; stop the workers (Shutdown, or kill when they failed or graceful is
        False); destroy the process group this engine created. Safe to repeat."""
        if self.workers is not None:
            graceful = graceful and self.workers.failure is None and not self.workers.in_flight
            if graceful:
                try:
                    self.workers.send(Shutdown())
                    self.workers.in_flight = False
                except Exception:  # noqa: BLE001 - a worker died: kill them all below
                    graceful = False
            self.workers.close(graceful)
        self._free()
        if (self.owns_process_group or self.workers is None and self.tp.size > 1) and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False
        self.workers = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _free(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
        if self.model is not None:
            kv_cache.bind(self.model, None)
        self.graphs = self.model = self.sampler = self.kv_cache = self.sampled = None


def build_model(config: Config, tp: TPInfo, device: torch.device) -> nn.Module:
    cls = model_class(config.hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.torch_dtype)
    try:
        with torch.device(device):
            model = cls(config.hf_config, tp, make_backend(config.attention_backend))
    finally:
        torch.set_default_dtype(default_dtype)
    load_model(model, config.model)
    return model


def sampling_tensors(s: SamplingInput, device: torch.device) -> SamplingTensors:
    def dev(a: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a).to(device=device, dtype=dtype, non_blocking=True)
    return SamplingTensors(temperatures=dev(s.temperatures, torch.float32), seeds=dev(s.seeds, torch.int64),
                           positions=dev(s.positions, torch.int64), top_k=dev(s.top_k, torch.int64),
                           top_p=dev(s.top_p, torch.float32), min_p=dev(s.min_p, torch.float32),
                           banned=dev(s.banned, torch.int64), all_greedy=not s.temperatures.any(),
                           logprob_rows=dev(s.logprob_rows, torch.int64), num_logprobs=s.num_logprobs)


def synthetic_prefill(num_seqs: int, seq_len: int, width: int, block_size: int) -> StepInput:
    """num_seqs prompts of seq_len tokens on consecutive blocks, block tables width wide."""
    blocks_per_seq = -(-seq_len // block_size)
    tables = np.full((num_seqs, width), -1, dtype=np.int32)
    tables[:, :blocks_per_seq] = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(num_seqs, -1)
    pos = np.tile(np.arange(seq_len, dtype=np.int32), num_seqs)
    rows = np.repeat(np.arange(num_seqs), seq_len)
    slots = tables[rows, pos // block_size] * block_size + pos % block_size
    cu = np.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=np.int32)
    return StepInput(is_prefill=True, input_ids=np.zeros(num_seqs * seq_len, dtype=np.int32),
                     prev_rows=None, positions=pos,
                     slot_mapping=slots.astype(np.int32), block_tables=tables, cu_seqlens_q=cu, cu_seqlens_k=cu,
                     sampling=SamplingInput(temperatures=np.zeros(num_seqs, np.float32),
                                            seeds=np.zeros(num_seqs, np.int64), positions=np.zeros(num_seqs, np.int64)))


def warmup_step(config: Config) -> StepInput:
    """The largest prefill the scheduler can build: max_num_batched_tokens over as few sequences as possible."""
    seq_len = min(config.max_model_len, config.max_num_batched_tokens)
    num_seqs = max(1, min(config.max_num_batched_tokens // seq_len, config.max_num_seqs))
    return synthetic_prefill(num_seqs, seq_len, -(-seq_len // config.kvcache_block_size), config.kvcache_block_size)


def channel_capacity(config: Config) -> int:
    """Bytes of the largest message: a prefill of max_num_batched_tokens tokens over as many sequences as may run,
    every block table max_model_len wide (pickled sizes depend only on array shapes), plus a margin."""
    n = config.max_num_batched_tokens
    b = min(config.max_num_seqs, n)

    def i32(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.int32)
    step = StepInput(True, i32(n), i32(n), i32(n), i32(n), i32(b, config.max_blocks_per_seq), i32(b + 1), i32(b + 1),
                     i32(b))
    return len(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)) + 4096
