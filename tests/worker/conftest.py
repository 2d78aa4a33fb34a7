"""Session fixtures for the worker engine tests: one tiny Llama checkpoint and PEFT adapters built in tmp dirs.

Why session scope: building a model + tokenizer + 5 adapters takes a few seconds; every test reuses them
read-only. Torch is limited to 2 threads because up to 7 helpers and CI share 2 cores.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# name -> (rank, use_rslora, targets, seed); ranks differ on purpose (padded slots of mixed ranks)
ADAPTERS = {
    "ad-r4": (4, False, None, 11),
    "ad-r8": (8, False, None, 12),
    "ad-r16rs": (16, True, None, 13),
    "ad-r2qv": (2, False, ["q_proj", "v_proj"], 14),
    "ad-r8v2": (8, False, None, 15),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from lorafleet.worker.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def adapters(tiny_model, adapter_root) -> dict[str, Path]:
    from lorafleet.worker.testing import build_peft_adapter

    out = {}
    for name, (rank, rs, targets, seed) in ADAPTERS.items():
        out[name] = build_peft_adapter(
            adapter_root / name, tiny_model, rank=rank, use_rslora=rs, targets=targets, seed=seed, std=0.1
        )
    return out


@pytest.fixture(scope="session")
def hf_peft(tiny_model, adapters):
    """transformers + peft with every adapter loaded: the numerical reference (mixed batches via adapter_names)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    names = list(adapters)
    pm = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    pm.eval()
    pm.generation_config.eos_token_id = None  # references generate exactly n tokens, like ignore_eos
    pm.base_model.model.generation_config.eos_token_id = None
    return pm


@pytest.fixture
def make_engine(tiny_model, adapter_root):
    """Factory for engines on the tiny model; every engine gets the adapter root allowed."""
    from lorafleet.worker.config import EngineConfig
    from lorafleet.worker.engine.llm_engine import LLMEngine

    def make(**kw) -> LLMEngine:
        kw.setdefault("device", "cpu")  # numerics are asserted in fp32 on CPU; GPU tests ask for cuda explicitly
        kw.setdefault("adapter_roots", [str(adapter_root)])
        kw.setdefault("block_size", 4)
        kw.setdefault("num_kv_blocks", 256)
        kw.setdefault("async_scheduling", False)  # step-by-step assertions; async tests and the auto test ask for it
        return LLMEngine(EngineConfig(model=str(kw.pop("model", tiny_model)), **kw))

    return make


@pytest.fixture(scope="session")
def hf_greedy(hf_peft):
    """Greedy continuation from transformers(+peft), forcing exactly n tokens (no EOS stop)."""
    return lambda prompt, n, adapter=None: _hf_greedy(hf_peft, prompt, n, adapter)


def _hf_greedy(pm, prompt: list[int], n: int, adapter: str | None) -> list[int]:
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = pm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0),
            adapter_names=[adapter or "__base__"],
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 server (versitygw) with an `adapters` bucket, one per test module."""
    from lorafleet.worker.lora.sources.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3") / "root") as srv:
        srv.client().create_bucket(Bucket="adapters")
        yield srv


@pytest.fixture
def s3_env(s3, monkeypatch):
    """`s3`, reachable through boto3's standard chain (environment) for the code under test."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


# ---- a network that drops a download ------------------------------------------------------------------------
class CutProxy:
    """A TCP proxy in front of a real server that closes one response part-way: a network that drops a download.

    `cut[marker] = n` makes the next response to a request whose first line contains `marker` stop after its headers
    and `n` body bytes (the headers still announce the whole length), then closes the connection; the entry is then
    removed, so the retry goes through whole. Everything else is forwarded byte for byte.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.cut: dict[bytes, int] = {}
        self.cuts = 0  # responses cut so far
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return  # closed
            up = socket.create_connection(self.upstream)
            pending: list[int] = []  # the body budget of the response to the request just forwarded, if cut
            self._start(self._requests, client, up, pending)
            self._start(self._responses, up, client, pending)

    def _requests(self, client: socket.socket, up: socket.socket, pending: list[int]) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                with self._lock:
                    marker = next((m for m in self.cut if m in line), None)
                    if marker is not None:
                        pending.append(self.cut.pop(marker))
                up.sendall(data)
        _close(client, up)

    def _responses(self, up: socket.socket, client: socket.socket, pending: list[int]) -> None:
        head = b""
        with suppress(OSError):
            while data := up.recv(65536):
                if not pending:
                    client.sendall(data)
                    continue
                head += data  # a cut response: headers, then at most pending[0] bytes of its body
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    continue
                keep = end + 4 + pending[0]
                if len(head) >= keep:
                    client.sendall(head[:keep])
                    with self._lock:
                        self.cuts += 1
                    break
        _close(client, up)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with suppress(OSError):
            s.close()


@pytest.fixture
def cut_s3(s3):
    """`s3` behind a CutProxy: (server, proxy); point boto3 at `proxy.endpoint`."""
    with CutProxy(("127.0.0.1", s3.port)) as proxy:
        yield s3, proxy
