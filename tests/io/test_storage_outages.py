"""Storage outages (issue 20, item 10): an S3 store that stops answering or refuses connections, before or during a
fit, on one process and on Ray. The store is the real moto server (tests/conftest.py) behind a TCP proxy that can
refuse (its listening socket closed: connection refused, open connections reset) or hang (connections accepted,
nothing answered: what a SIGSTOPped or black-holed server looks like to a client)."""
from __future__ import annotations

import logging
import pickle
import socket
import threading
import time
import traceback

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.io import storage

BOUND_S = 3.0  # RAYTRAINER_STORAGE_TIMEOUT_S in these tests (default 30)


class Outage:
    """A TCP proxy to ``upstream_port`` on 127.0.0.1 whose ``refuse()``, ``hang()`` and ``up()`` switch the outage.

    Ray ranks switch it through ``control_port``: a connection that sends ``refuse`` or ``hang`` (one line). Only
    the first such command counts, so a rank that runs the same step again after a restart does not start a second
    outage."""

    def __init__(self, upstream_port: int | None, mode: str = "up") -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.commanded = False
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._up = threading.Event()
        if mode == "up":
            self._up.set()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._server: socket.socket | None = None
        if mode != "refuse":
            self._listen()
        self._control = socket.create_server(("127.0.0.1", 0))
        self.control_port = self._control.getsockname()[1]
        threading.Thread(target=self._control_loop, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(128)
        self._server = server
        threading.Thread(target=self._accept_loop, args=(server,), daemon=True).start()

    def _accept_loop(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by refuse()
            with self._lock:
                self._open.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._up.wait()  # hang: the connection is accepted and nothing is answered
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.append(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                self._up.wait()
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def refuse(self) -> None:
        with self._lock:
            self.mode = "refuse"
            self._up.clear()
            if self._server is not None:
                self._server.close()
                self._server = None
            for s in self._open:  # reset what is open
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
                except OSError:
                    pass
            self._open.clear()

    def hang(self) -> None:
        with self._lock:
            self.mode = "hang"
            self._up.clear()

    def up(self) -> None:
        with self._lock:
            if self._server is None:
                self._listen()
            self.mode = "up"
            self._up.set()

    def _control_loop(self) -> None:
        while True:
            conn, _ = self._control.accept()
            with conn:
                command = conn.makefile().readline().strip()
            if command in ("refuse", "hang") and not self.commanded:
                self.commanded = True
                getattr(self, command)()


def command(control_port: int, what: str) -> None:
    """Ask the Outage listening on ``control_port`` to ``what`` (from any process)."""
    with socket.create_connection(("127.0.0.1", control_port)) as conn:
        conn.sendall(f"{what}\n".encode())


class Net(rt.LightningModule):
    """A small regression that logs its loss every step; with ``outage``, rank 0 starts an outage of the Outage at
    ``control_port`` at step ``at`` (and, with ``then_raise``, raises a plain error in the same step)."""

    def __init__(self, control_port: int = 0, outage: str = "", at: int = 3, then_raise: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.control_port, self.outage, self.at, self.then_raise = control_port, outage, at, then_raise

    def training_step(self, batch, batch_idx):
        if self.outage and self.global_step == self.at and self.global_rank == 0:
            command(self.control_port, self.outage)
            if self.then_raise:
                raise ValueError(f"a bug at step {self.at}")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


@pytest.fixture
def proxied(s3_server, monkeypatch):
    """The moto bucket behind an Outage; s3:// URIs go through the proxy, and storage's bound is BOUND_S."""
    outage = Outage(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    monkeypatch.setenv("RAYTRAINER_S3_ENDPOINT", outage.endpoint)
    monkeypatch.setenv(storage.STORAGE_TIMEOUT_ENV, str(BOUND_S))
    yield outage, f"{s3_server['uri']}/run"
    outage.up()


@pytest.fixture
def warnings_seen():
    """(time.monotonic(), message) of every warning on the 'raytrainer' logger."""
    seen: list[tuple[float, str]] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append((time.monotonic(), record.getMessage()))

    handler = Recorder()
    logging.getLogger("raytrainer").addHandler(handler)
    yield seen
    logging.getLogger("raytrainer").removeHandler(handler)


def _trainer(root: str, **kw) -> rt.Trainer:
    args = dict(default_root_dir=root, max_steps=12, enable_progress_bar=False, enable_model_summary=False,
                log_every_n_steps=1, logger=rt.loggers.CSVLogger(root, flush_logs_every_n_steps=1),
                callbacks=[rt.ModelCheckpoint(every_n_train_steps=1, save_last=True)])
    args.update(kw)
    return rt.Trainer(**args)


def _env(monkeypatch, endpoint: str) -> None:
    for name, value in {"RAYTRAINER_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                        storage.STORAGE_TIMEOUT_ENV: str(BOUND_S)}.items():
        monkeypatch.setenv(name, value)


# ---------------------------------------------------------------------------------------------------- storage level

def test_storage_error_is_retryable_an_oserror_and_survives_pickling():
    err = storage.StorageTimeout("writing checkpoint s3://b/last.ckpt: storage did not answer", uri="s3://b/last.ckpt",
                                 what="writing checkpoint")
    err.add_note("a note")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, storage.StorageError) and isinstance(back, OSError) and back.retryable
    assert (type(back), str(back), back.uri, back.what, back.__notes__) == \
        (storage.StorageTimeout, str(err), err.uri, err.what, ["a note"])


def test_bound_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(storage.STORAGE_TIMEOUT_ENV, raising=False)
    assert storage.storage_timeout_s() == 30.0
    monkeypatch.setenv(storage.STORAGE_TIMEOUT_ENV, "4.5")
    assert storage.storage_timeout_s() == 4.5
    monkeypatch.setenv(storage.STORAGE_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=storage.STORAGE_TIMEOUT_ENV):
        storage.storage_timeout_s()


def test_a_write_to_an_unresponsive_store_fails_within_the_bound_naming_it(monkeypatch, warnings_seen):
    outage = Outage(None, mode="hang")
    _env(monkeypatch, outage.endpoint)
    start = time.monotonic()
    with pytest.raises(storage.StorageTimeout) as info:
        storage.save({"w": torch.zeros(3)}, "s3://bucket/x/last.ckpt")
    took = time.monotonic() - start
    assert took < 2 * BOUND_S, took  # 3 tries of BOUND_S / 3 each, plus the SDK's backoff between them
    assert str(info.value).startswith(f"writing checkpoint s3://bucket/x/last.ckpt: storage did not answer within "
                                      f"{BOUND_S:g} s"), info.value
    assert info.value.retryable and info.value.uri == "s3://bucket/x/last.ckpt"
    slow = [t for t, m in warnings_seen if m.startswith("storage is slow: writing checkpoint s3://bucket/x/")]
    assert slow and slow[0] - start < BOUND_S / 3 + 1.0, warnings_seen
    # in a teardown after that, the same store is not waited for again
    start = time.monotonic()
    with storage.skip_unresponsive(), pytest.raises(storage.StorageTimeout, match="not attempted"):
        storage.write_bytes_atomic("s3://bucket/x/metrics.csv", b"step\n", manifest=False)
    assert time.monotonic() - start < 0.5


def test_a_refused_connection_is_a_named_retryable_storage_error(monkeypatch):
    outage = Outage(None, mode="refuse")
    _env(monkeypatch, outage.endpoint)
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes_atomic("s3://bucket/run/events.jsonl", b"{}\n", manifest=False)
    assert not isinstance(info.value, storage.StorageTimeout)
    assert str(info.value).startswith("writing s3://bucket/run/events.jsonl: storage could not be reached")
    assert info.value.retryable


def test_answers_from_the_store_are_not_outages(s3_server):
    with pytest.raises(FileNotFoundError):
        storage.read_verified(f"{s3_server['uri']}/nothing.ckpt")
    assert not storage.exists(f"{s3_server['uri']}/nothing.ckpt")


# ---------------------------------------------------------------------------------------------------- one process

def test_fit_against_an_unresponsive_store_fails_within_about_one_bound(monkeypatch, warnings_seen):
    outage = Outage(None, mode="hang")
    _env(monkeypatch, outage.endpoint)
    start = time.monotonic()
    with pytest.raises(storage.StorageTimeout) as info:
        _trainer("s3://bucket/run").fit(Net(), data())
    took = time.monotonic() - start
    assert took < 3 * BOUND_S, took  # before: 2 calls x 3 tries x 60 s, with nothing printed
    assert "s3://bucket/run/lightning_logs" in str(info.value) and f"within {BOUND_S:g} s" in str(info.value)
    assert warnings_seen and warnings_seen[0][0] - start < BOUND_S / 3 + 1.0, warnings_seen
    assert warnings_seen[0][1].startswith("storage is slow: listing the versions in s3://bucket/run/lightning_logs")


class _OutageAt(rt.Callback):
    """Starts an outage (``start``: the proxy's hang or refuse) before step 3, once; ``at`` is when."""

    def __init__(self, start) -> None:
        self.start, self.at = start, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 3 and self.at is None:
            self.at = time.monotonic()
            self.start()


@pytest.mark.slow
def test_store_hanging_during_a_fit_fails_it_within_about_one_bound(proxied, warnings_seen):
    outage, root = proxied

    hang = _OutageAt(outage.hang)
    with pytest.raises(storage.StorageTimeout) as info:
        _trainer(root, callbacks=[hang, rt.ModelCheckpoint(every_n_train_steps=1, save_last=True)]).fit(Net(), data())
    took = time.monotonic() - hang.at
    # One call, then the teardown's writes (logger, events) do not wait again. A failing upload (PutObject) takes
    # about 7 s per try beyond the timeout in the S3 client (3 tries): 3 x (7 + BOUND_S / 3) s at most here, about
    # 51 s with the default bound; before, 3 x (60 + 7) s per request, and every later write waited as long.
    assert took < 30, took
    assert f"{root}/" in str(info.value) and f"did not answer within {BOUND_S:g} s" in str(info.value)
    first_warning = next(t for t, m in warnings_seen if m.startswith("storage is slow"))
    assert first_warning - hang.at < BOUND_S / 3 + 1.0, warnings_seen


@pytest.mark.slow
def test_store_refusing_during_a_fit_raises_the_first_failure_not_the_loggers_finalize(proxied, warnings_seen):
    outage, root = proxied

    with pytest.raises(storage.StorageError) as info:
        callbacks = [_OutageAt(outage.refuse), rt.ModelCheckpoint(every_n_train_steps=1, save_last=True)]
        _trainer(root, callbacks=callbacks).fit(Net(), data())
    err = info.value
    frames = [f.name for f in traceback.extract_tb(err.__traceback__)]
    assert "finalize" not in frames, frames  # before: CSVLogger.finalize's write raised over the first failure
    assert f"{root}/" in str(err) and "storage could not be reached" in str(err), err
    notes = getattr(err, "__notes__", [])
    assert any(n.startswith("then CSVLogger.finalize failed too: StorageError") for n in notes), notes


# ---------------------------------------------------------------------------------------------------- Ray

class RestoreOnFailure(logging.Handler):
    """Ends the outage once the driver has printed the run's failure line (the failure is recorded)."""

    def __init__(self, outage: Outage) -> None:
        super().__init__()
        self.outage = outage

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("[failure]"):
            self.outage.up()


@pytest.mark.slow
def test_ray_fit_retries_a_transient_storage_error_and_finishes(local_ray, proxied):
    from raytrainer.core.events import read_events

    outage, root = proxied
    restore = RestoreOnFailure(outage)
    logging.getLogger("raytrainer").addHandler(restore)
    try:
        trainer = _trainer(root, num_processes=2, max_failures=1)
        trainer.fit(Net(outage.control_port, "refuse", at=3), data())
    finally:
        logging.getLogger("raytrainer").removeHandler(restore)
    assert outage.commanded and trainer.global_step == 12
    events = read_events(trainer.log_dir)
    failure = next(e for e in events if e["event"] == "failure")
    assert failure["cause"].startswith("StorageError: "), failure  # retried: before, a plain OSError ended the run
    assert [e["event"] for e in events if e["event"] != "checkpoint"][-2:] == ["restart", "finish"], events


@pytest.mark.slow
def test_ray_driver_events_write_failing_does_not_hide_the_ranks_error(local_ray, proxied):
    from raytrainer.launchers.ray.group import RankError

    outage, root = proxied
    with pytest.raises(RankError) as info:  # before: the driver's OSError writing events.jsonl
        _trainer(root, num_processes=2).fit(Net(outage.control_port, "refuse", at=3, then_raise=True), data())
    assert isinstance(info.value.exception, ValueError) and "a bug at step 3" in str(info.value.exception)
