"""Rank 0 -> worker commands over shared memory: [4-byte length][pickled (method, args)]."""
import pickle
import uuid
from multiprocessing.shared_memory import SharedMemory

HEADER = 4


def unique_shm_name() -> str:
    return f"nanovllm-{uuid.uuid4().hex[:16]}"


class ShmChannel:
    def __init__(self, name: str, size: int = 0, create: bool = False) -> None:
        self.name = name
        self.shm = SharedMemory(name=name, create=create, size=size if create else 0)
        self.owner = create

    def write(self, method: str, *args) -> None:
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if HEADER + len(data) > self.shm.size:
            raise RuntimeError(f"command {method!r} needs {len(data)} bytes but the shared-memory buffer holds "
                               f"{self.shm.size - HEADER}; lower max_num_batched_tokens or max_num_seqs")
        self.shm.buf[HEADER:HEADER + len(data)] = data
        self.shm.buf[:HEADER] = len(data).to_bytes(HEADER, "little")

    def read(self) -> tuple[str, tuple]:
        n = int.from_bytes(self.shm.buf[:HEADER], "little")
        return pickle.loads(self.shm.buf[HEADER:HEADER + n])

    def close(self) -> None:
        if self.shm is None:
            return
        self.shm.close()
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
        self.shm = None


def channel_size(max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int) -> int:
    """Bytes for the largest command: every scheduled token id, every block table, per-sequence fields."""
    return (1 << 20) + 10 * (max_num_batched_tokens + max_num_seqs * (max_blocks_per_seq + 2)) + 1024 * max_num_seqs
