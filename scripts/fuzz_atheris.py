#!/usr/bin/env python3
"""Coverage-guided long fuzzing runs with atheris (libFuzzer), one handler of external input per run.

    pip install -e '.[fuzz]'                                   # atheris (Linux, CPython 3.10 - 3.12 wheels)
    python scripts/fuzz_atheris.py manifest -atheris_runs=20000
    python scripts/fuzz_atheris.py config -max_total_time=3600
    python scripts/fuzz_atheris.py chunk --corpus ~/fuzz/chunk -print_final_stats=1

Targets (what a clean rejection is for each: tests/support/fuzzing.py):

    manifest         raw bytes as an MQTT update manifest -> the agent's MqttClient -> UpdateManager
    manifest_signed  bytes parsed as JSON and, when an object, signed with the trusted key first, so
                     the coverage reaches the schema and every check after the signature
    chunk            `<topic suffix>\\n<payload>`: the topic is `edge/<suffix>` (the chunk's header:
                     transfer id and index), into the same busy UpdateManager
    config           bytes as a config file -> load_config
    transfer_state   bytes as a `<transfer>.state` file -> ChunkAssembler resuming a transfer

The MQTT targets run against an UpdateManager busy with a half-received transfer over a real
ModelStore, and check after every rejected or ignored input that nothing changed (store files,
transfer state, the manager's memory). A crash (any other exception, a traceback the agent logged
from a callback's catch-all) or a state change raises: libFuzzer stops and writes the input to
`<corpus>/../crash-<sha1>`. Everything after the target and `--corpus DIR` goes to libFuzzer
(`-atheris_runs=N`, `-max_total_time=S`, `-jobs=N`, ...). The corpus starts from valid seeds and
keeps every input that found new coverage, so a later run goes on from there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # pragma: no cover - the optional extra
    sys.exit("fuzz_atheris: atheris is not installed: pip install -e '.[fuzz]' (or pip install atheris)")

# instrumented for coverage before tests.support.fuzzing imports them
with atheris.instrument_imports(include=["agent", "yaml"]):
    for _mod in ("agent.config", "agent.mqtt.client", "agent.mqtt.topics", "agent.updates.manager",
                 "agent.updates.manifest", "agent.updates.transfer", "agent.models.store"):
        importlib.import_module(_mod)

from tests.support import fuzzing as fz  # noqa: E402

TARGETS = ("manifest", "manifest_signed", "chunk", "config", "transfer_state")


class FuzzFailure(AssertionError):
    """A crash or a state change: libFuzzer records the input that caused it."""


def _check(out: fz.Outcome) -> None:
    if out.crash is not None:
        raise FuzzFailure(f"{out.handler}: crash\n{out.crash}")
    if out.changed:
        raise FuzzFailure(f"{out.handler}: {out.verdict} input changed state: {out.changed}")


def _seeds(target: str, harness: fz.UpdateHarness | None) -> list[bytes]:
    """Valid inputs (and a few near misses) to start the corpus from."""
    import random

    data = random.Random(0).randbytes(1000)
    docs = [fz.base_manifest(data), fz.base_manifest(data, mqtt_chunk=256, manifest_id="m-fuzz-0002"),
            fz.base_manifest(data, version="1.2.3", devices=[], groups=[fz.GROUP], manifest_id="m-fuzz-0003")]
    if target == "manifest":
        assert harness is not None
        return [fz.sign(d, harness.key) for d in docs] + [b"{}", b'{"signature": "", "key_id": "ops"}']
    if target == "manifest_signed":
        return [json.dumps(d).encode() for d in docs]
    if target == "chunk":
        assert harness is not None
        tid = harness.busy_tid
        return [f"{fz.DEVICE}/model/chunks/{tid}/{i}\n".encode() + bytes(fz.BUSY_CHUNK) for i in (0, 1, 1023)] + \
            [f"group/{fz.GROUP}/model/chunks/{tid}/3\n".encode() + b"x" * 10]
    if target == "config":
        return [text.encode() for text, _ in fz.config_seeds()]
    return [json.dumps(fz.valid_transfer_state(n)).encode() for n in (0, 7, fz.STATE_CHUNKS)]


def _mqtt_target(target: str, work: Path, stack: ExitStack) -> tuple[Callable[[bytes], None], list[bytes]]:
    traces = stack.enter_context(fz.captured_agent_logs())
    h = fz.UpdateHarness(work / "updates")
    stack.callback(h.close)

    def manifest(data: bytes) -> None:
        _check(h.deliver("manifest", h.topics.model_update, data, traces))

    def manifest_signed(data: bytes) -> None:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            doc = None
        payload = fz.sign(doc, h.key) if isinstance(doc, dict) else data
        _check(h.deliver("manifest", h.topics.model_update, payload, traces))

    def chunk(data: bytes) -> None:
        head, _, payload = data.partition(b"\n")
        _check(h.deliver("chunk", b"edge/" + head, payload, traces))

    one = {"manifest": manifest, "manifest_signed": manifest_signed, "chunk": chunk}[target]
    return one, _seeds(target, h)


def make_target(target: str, work: Path, stack: ExitStack) -> tuple[Callable[[bytes], None], list[bytes]]:
    if target in ("manifest", "manifest_signed", "chunk"):
        return _mqtt_target(target, work, stack)
    if target == "config":
        cfg = work / "config" / "agent.yaml"
        cfg.parent.mkdir(parents=True)

        def config(data: bytes) -> None:
            _check(fz.run_config_file(cfg, data))

        return config, _seeds(target, None)

    def transfer_state(data: bytes) -> None:
        _check(fz.run_transfer_state(work / "transfer", data))

    return transfer_state, _seeds(target, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s TARGET [--corpus DIR] [libFuzzer flags...]")
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--corpus", type=Path, default=None,
                    help="corpus folder, kept between runs (default: $TMPDIR/edge-agent-fuzz/TARGET/corpus)")
    args, libfuzzer = ap.parse_known_args()
    corpus: Path = args.corpus or Path(tempfile.gettempdir()) / "edge-agent-fuzz" / args.target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    work = corpus.parent / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stack = ExitStack()
    one, seeds = make_target(args.target, work, stack)
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    if not any(a.startswith("-artifact_prefix=") for a in libfuzzer):
        libfuzzer.append(f"-artifact_prefix={corpus.parent}/")
    print(f"fuzz_atheris: target {args.target}, corpus {corpus}, artifacts {corpus.parent}/", file=sys.stderr)
    atheris.Setup([sys.argv[0], *libfuzzer, str(corpus)], one)
    try:
        atheris.Fuzz()
    finally:
        stack.close()


if __name__ == "__main__":
    main()
