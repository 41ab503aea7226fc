"""Rank 0 -> workers messages over one shared-memory buffer, with an explicit protocol.

Layout: [seq u64][length u64][ack u64 per reader][payload]. The writer publishes message k by writing the payload,
then its length, then seq = k. Reader r reads message k (it is woken through its pipe after the write), then sets
ack[r] = k. The writer writes message k + 1 only once every ack equals k, so a message is never overwritten before
every reader has read it, whatever the message does (no collective needed in between)."""
import pickle
import struct
import uuid
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from typing import Any

U64 = struct.Struct("<Q")


def unique_shm_name() -> str:
    return f"nanovllm-{uuid.uuid4().hex[:16]}"


class ShmChannel:
    def __init__(self, name: str, num_readers: int, capacity: int = 0, create: bool = False) -> None:
        """capacity: payload bytes (writer side, create=True); readers attach to an existing channel."""
        self.name = name
        self.num_readers = num_readers
        self.header = 8 * (2 + num_readers)
        self.shm = SharedMemory(name=name, create=create, size=self.header + capacity if create else 0)
        self.owner = create
        self.seq = 0  # writer: last message published; reader: last message read
        if create:
            self.shm.buf[:self.header] = bytes(self.header)

    @property
    def capacity(self) -> int:
        return self.shm.size - self.header

    def _u64(self, i: int) -> int:
        return U64.unpack_from(self.shm.buf, 8 * i)[0]

    def write(self, message: Any, wait: Callable[[], None]) -> None:
        """Publish message; while a reader has not read the previous one, call wait() (which raises to give up)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.capacity:
            raise RuntimeError(f"message {type(message).__name__} needs {len(data)} bytes but the shared-memory "
                               f"channel holds {self.capacity}")
        while any(self._u64(2 + r) != self.seq for r in range(self.num_readers)):
            wait()
        self.shm.buf[self.header:self.header + len(data)] = data
        U64.pack_into(self.shm.buf, 8, len(data))
        self.seq += 1
        U64.pack_into(self.shm.buf, 0, self.seq)

    def read(self, reader: int) -> Any:
        seq = self._u64(0)
        if seq != self.seq + 1:
            raise RuntimeError(f"shared-memory channel out of step: reader {reader} expected message {self.seq + 1}, "
                               f"found {seq}")
        length = self._u64(1)
        message = pickle.loads(self.shm.buf[self.header:self.header + length])
        self.seq = seq
        U64.pack_into(self.shm.buf, 8 * (2 + reader), seq)
        return message

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
