"""Property: any mutation of a valid GGUF either reads fully or raises GGUFError; nothing else escapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_sandbox.errors import GGUFError
from tests.gguf import builders
from tests.gguf.builders import MUTATORS, Mutation

SEEDS = builders.seed_files()
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutations_of(seed: builders.Built) -> st.SearchStrategy[Mutation]:
    """Edits anywhere, or aimed at a field start with a boundary integer in either byte order."""
    anywhere = st.integers(0, len(seed.data))
    aimed = st.sampled_from(sorted(set(seed.offsets.values())))
    boundary = st.builds(
        builders.interesting_payload,
        st.sampled_from(builders.INTERESTING_INTS),
        st.sampled_from((1, 4, 8)),
        st.sampled_from(("<", ">")),
    )
    return st.builds(
        Mutation,
        kind=st.sampled_from(tuple(MUTATORS)),
        position=st.one_of(anywhere, aimed),
        payload=st.one_of(st.binary(min_size=1, max_size=8), boundary),
        amount=st.integers(0, 16),
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "input.gguf"


def outcome(path: Path, data: bytes) -> str:
    """'accepted' or 'refused'; any exception other than GGUFError propagates and fails the test."""
    path.write_bytes(data)
    try:
        builders.consume(path)
    except GGUFError as error:
        assert str(error), "a GGUFError must explain itself"
        return "refused"
    return "accepted"


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_files_read_fully(scratch: Path, name: str) -> None:
    assert outcome(scratch, SEEDS[name].data) == "accepted"


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_files_only_raise_gguf_error(scratch: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SEEDS)), label="seed")
    seed = SEEDS[name]
    mutations = data.draw(st.lists(mutations_of(seed), min_size=1, max_size=4), label="mutations")
    outcome(scratch, builders.apply(seed.data, mutations))


@FUZZ_SETTINGS
@given(
    name=st.sampled_from(sorted(SEEDS)), cut=st.floats(0, 1, exclude_max=True), flip=st.integers(0, 1 << 16)
)
def test_truncated_files_are_refused_even_after_a_flip(
    scratch: Path, name: str, cut: float, flip: int
) -> None:
    seed = SEEDS[name].data
    truncated = seed[: int(cut * len(seed))]
    # The builder writes no trailing padding, so every proper prefix cuts into the last tensor's data.
    assert outcome(scratch, truncated) == "refused"
    outcome(scratch, builders.apply(truncated, [Mutation("flip", flip, amount=flip >> 3)]))
