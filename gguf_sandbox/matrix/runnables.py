"""What a workload entry of matrix.yaml runs: the built-in workloads and controls, their options, argv."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gguf_sandbox import units
from gguf_sandbox.units import GIB, KIB, TIB, UnitError, format_size
from gguf_sandbox.workloads.command import PEER_WORKLOADS, POOLING_WORKLOADS, VECTOR_WORKLOADS
from gguf_sandbox.workloads.report import MAX_BATCH, MAX_COUNT, MAX_THREADS, MAX_VECTORS


class RunKind(str, enum.Enum):
    """How a workload entry becomes the argv after `python`."""

    WORKLOAD = "workload"  # python -m gguf_sandbox workload NAME --model {model} --opt value …
    CONTROL = "control"  # python -m gguf_sandbox.controls NAME --model {model} --opt value …
    COMMAND = "command"  # python <command …> verbatim ({model} substituted by the backend)


class OptionKind(str, enum.Enum):
    """What an option's value is, on the command line of the workload or control that takes it."""

    INTEGER = "integer"  # a whole number: argparse type=int
    SIZE = "size"  # a size in the units grammar (16m): parsed by units.parse_size inside the cell
    CHOICE = "choice"  # one of a few names


@dataclass(frozen=True)
class Option:
    """One option of a built-in workload or control: its kind, its range or choices, and its default.

    `default` is what the runnable uses when the matrix does not give the option (None: it depends on the
    workload, see workloads.DEFAULT_COUNTS). tests/test_matrix_input.py keeps names, kinds and defaults
    equal to the argparse options of workloads.py and controls.py.
    """

    kind: OptionKind
    default: int | str | None
    minimum: int = 1
    maximum: int = 1
    choices: tuple[str, ...] = ()

    def check(self, value: object) -> str:
        """The value as its argv word (spelled as written, so cell fingerprints stay), or UnitError."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UnitError(f"expected {self.describe()}, got {units.show(value)}")
        if self.kind is OptionKind.CHOICE:
            if value not in self.choices:
                raise UnitError(f"expected one of {', '.join(self.choices)}, got {units.show(value)}")
        elif self.kind is OptionKind.SIZE:
            units.parse_size(value, self.minimum, self.maximum)
        elif isinstance(value, str) and not re.fullmatch(r"\d{1,12}", value):
            raise UnitError(f"expected {self.describe()}, got {units.show(value)}")
        elif not self.minimum <= int(value) <= self.maximum:
            raise UnitError(f"{value} is out of range: give {self.describe()}")
        return str(value)

    def describe(self) -> str:
        if self.kind is OptionKind.CHOICE:
            return "one of " + ", ".join(self.choices)
        if self.kind is OptionKind.SIZE:
            return f"a size from {format_size(self.minimum)} to {format_size(self.maximum)}"
        return f"a whole number from {self.minimum:,} to {self.maximum:,}"


# Weight plans of the embedding engine (embed.weights.PlanName) plus "auto"; kept in sync by a test.
PLAN_CHOICES = ("auto", "resident-int8", "resident-f32", "resident-quant", "streaming")
# Poolings a workload may ask for instead of the model's (embed.bert.POOLING_NAMES); kept in sync by a test.
POOLING_CHOICES = ("mean", "cls", "last")
_WORKLOAD_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "count": Option(OptionKind.INTEGER, None, 1, MAX_COUNT),
        "threads": Option(OptionKind.INTEGER, 8, 1, MAX_THREADS),
        "batch": Option(OptionKind.INTEGER, 1, 1, MAX_BATCH),
        "plan": Option(OptionKind.CHOICE, "auto", choices=PLAN_CHOICES),
        "pooling": Option(OptionKind.CHOICE, None, choices=POOLING_CHOICES),
        # Whole vectors of N texts in the report (embed and the peers only: see _options_of).
        "vectors": Option(OptionKind.INTEGER, None, 0, MAX_VECTORS),
    }
)

# A peer embeds the corpus like `embed`: how many texts, how many per call, which pooling, and the whole
# vectors of how many texts — at least one: they are how it is judged (by cosine to ours).
_PEER_OPTIONS = ("count", "batch", "pooling", "vectors")
_PEER_VECTORS = Option(OptionKind.INTEGER, None, 1, MAX_VECTORS)


def _options_of(workload: str, names: tuple[str, ...] = tuple(_WORKLOAD_OPTIONS)) -> Mapping[str, Option]:
    """The options the `workload` command takes for it: --pooling and --vectors only where it applies them
    (elsewhere the command refuses them, and every such cell would end as a crash at run time)."""
    return MappingProxyType(
        {
            name: _WORKLOAD_OPTIONS[name]
            for name in names
            if (name != "pooling" or workload in POOLING_WORKLOADS)
            and (name != "vectors" or workload in VECTOR_WORKLOADS)
        }
    )


_BOMB_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "step": Option(OptionKind.SIZE, "16m", 4 * KIB, GIB),
        "max": Option(OptionKind.SIZE, "4g", 4 * KIB, TIB),
    }
)

_PERTURBED_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {"count": Option(OptionKind.INTEGER, 100, 1, 1_000_000)}
)


@dataclass(frozen=True)
class Runnable:
    """A workload or control the package ships: which options it takes and what it needs."""

    options: Mapping[str, Option]
    needs_model: bool
    # Its report carries a checksum of vectors that must equal the unconstrained run's.
    checks_vectors: bool = False
    # Its client runs on the host and drives a server started inside the cell (CellSpec.host_side).
    host_side: bool = False
    # A peer engine (workloads/peers.py): runs where the peers are installed, and its vectors are compared
    # by cosine with ours — the `embed` workload with the same options, unconstrained (its reference).
    peer: bool = False


WORKLOADS: Mapping[str, Runnable] = MappingProxyType(
    {
        "parse": Runnable(_options_of("parse"), needs_model=True),
        "stream": Runnable(_options_of("stream"), needs_model=True),
        "embed": Runnable(_options_of("embed"), needs_model=True, checks_vectors=True),
        "embed-concurrent": Runnable(_options_of("embed-concurrent"), needs_model=True, checks_vectors=True),
        "mcp": Runnable(_options_of("mcp"), needs_model=True, checks_vectors=True, host_side=True),
        **{
            name: Runnable(
                MappingProxyType({**_options_of(name, _PEER_OPTIONS), "vectors": _PEER_VECTORS}),
                needs_model=True,
                checks_vectors=True,
                peer=True,
            )
            for name in PEER_WORKLOADS
        },
    }
)

CONTROLS: Mapping[str, Runnable] = MappingProxyType(
    {
        "naive-load": Runnable(MappingProxyType({}), needs_model=True),
        "alloc-bomb": Runnable(_BOMB_OPTIONS, needs_model=False),
        "refusing-engine": Runnable(MappingProxyType({}), needs_model=False),
        "perturbed-engine": Runnable(_PERTURBED_OPTIONS, needs_model=True, checks_vectors=True),
    }
)

RUNNABLES: Mapping[RunKind, Mapping[str, Runnable]] = MappingProxyType(
    {RunKind.WORKLOAD: WORKLOADS, RunKind.CONTROL: CONTROLS}
)

ARGV_PREFIX: Mapping[RunKind, tuple[str, ...]] = MappingProxyType(
    {
        RunKind.WORKLOAD: ("-m", "gguf_sandbox", "workload"),
        RunKind.CONTROL: ("-m", "gguf_sandbox.controls"),
        RunKind.COMMAND: (),
    }
)
