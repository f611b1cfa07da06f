"""matrix.yaml loading, validation errors and the pure expansion into cells."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.floors import Floor, FloorTable
from gguf_sandbox.matrix.expand import expand, expand_cells
from gguf_sandbox.matrix.load import load, parse
from gguf_sandbox.matrix.runner import reference_spec
from gguf_sandbox.matrix.schema import FINISHED, GRACEFUL, Matrix
from gguf_sandbox.matrix.sizes import size_at
from gguf_sandbox.matrix.verdicts import Verdict
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/cache")


def base_doc() -> dict[str, Any]:
    return {
        "pythons": ["3.11", "3.12"],
        "memory": ["64m", "256m"],
        "backends": ["cgroup", "docker"],
        "models": {
            "tiny": {"synthesize": {"size": "1m"}},
            "mine": {"path": "models/mine.gguf"},
        },
        "workloads": {
            "parse": {"models": ["tiny", "mine"]},
            "embed": {"args": {"count": 10}, "models": ["tiny"]},
            "bomb": {"control": "alloc-bomb", "args": {"step": "8m"}},
        },
        "expect": {
            "rules": [
                {"match": {"workload": "bomb"}, "expect": ["oom"]},
                {"match": {"workload": "bomb", "memory": ">=256m", "python": ">=3.12"}, "expect": "pass"},
            ]
        },
        "profiles": {"small": {"memory": ["64m"], "workloads": ["bomb"], "backends": ["cgroup"]}},
    }


def build(doc: dict[str, Any] | None = None) -> Matrix:
    return parse(doc if doc is not None else base_doc(), base_dir=Path("/repo"))


def ids(matrix: Matrix, **kwargs: Any) -> list[str]:
    return [cell.cell_id for cell in expand_cells(matrix, cache_dir=CACHE, **kwargs)]


# --------------------------------------------------------------------------- sizes


# --------------------------------------------------------------------------- validation errors


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


_DELETE = object()

ERROR_CASES = [
    ("unknown-top-key", "pythonz", ["3.11"], r"matrix\.pythonz: unknown key; did you mean 'pythons'"),
    ("missing-pythons", "pythons", _DELETE, r"missing required key 'pythons'"),
    ("float-python", "pythons", [3.1], r"pythons\[0\]: .*quote versions"),
    ("bad-python", "pythons", ["2.7.1"], r"pythons\[0\]: '2\.7\.1' is not a Python version"),
    ("bad-size", "memory", ["64m", "lots"], r"memory\[1\]: 'lots' is not a size"),
    ("empty-memory", "memory", [], r"memory: must not be empty"),
    ("unknown-backend", "backends", ["podman"], r"backends\[0\]: unknown backend 'podman'"),
    ("bad-timeout", "timeout", "soon", r"timeout: expected seconds"),
    (
        "unknown-workload",
        "workloads.embedd",
        {"models": ["tiny"]},
        r"workloads\.embedd\.workload: unknown workload 'embedd'; known: parse, stream",
    ),
    (
        "unknown-control",
        "workloads.bomb.control",
        "fork-bomb",
        r"workloads\.bomb\.control: unknown control 'fork-bomb'",
    ),
    ("unknown-workload-key", "workloads.parse.modles", ["tiny"], r"workloads\.parse\.modles: unknown key"),
    ("unknown-option", "workloads.embed.args", {"cnt": 1}, r"workloads\.embed\.args\.cnt: unknown option"),
    (
        "unknown-model-ref",
        "workloads.parse.models",
        ["huge"],
        r"workloads\.parse\.models\[0\]: unknown model",
    ),
    ("model-required", "workloads.parse.models", [], r"workloads\.parse\.models: workload 'parse' needs"),
    ("model-forbidden", "workloads.bomb.models", ["tiny"], r"workloads\.bomb\.models: control 'alloc-bomb'"),
    (
        "two-kinds",
        "workloads.bomb.workload",
        "parse",
        r"workloads\.bomb: give at most one of workload, control, command",
    ),
    ("bad-model-name", "models.Tiny-2", {"path": "x"}, r"models\.Tiny-2: model names are lower-case"),
    ("two-sources", "models.tiny.path", "x.gguf", r"models\.tiny: give exactly one source"),
    ("unknown-source", "models.tiny", {"download": "hf"}, r"models\.tiny\.download: unknown key"),
    ("synth-size", "models.tiny.synthesize", {"size": "big"}, r"models\.tiny\.synthesize\.size"),
    (
        "convert-type",
        "models.conv",
        {"convert": {"package": "p", "type": "q3_k"}},
        r"models\.conv\.convert\.type: unknown type 'q3_k'",
    ),
    (
        "convert-source",
        "models.conv",
        {"convert": {"type": "q8_0"}},
        r"models\.conv\.convert: give either 'package'",
    ),
    ("unknown-verdict", "expect.default", ["pass", "ok"], r"expect\.default\[1\]: unknown verdict 'ok'"),
    ("rule-key", "expect.rules.0.match", {"mem": "64m"}, r"expect\.rules\[0\]\.match\.mem: unknown key"),
    ("rule-size", "expect.rules.0.match", {"memory": "<=lots"}, r"expect\.rules\[0\]\.match\.memory"),
    ("rule-no-expect", "expect.rules.0.expect", _DELETE, r"expect\.rules\[0\]: missing 'expect'"),
    ("exclude-key", "exclude", [{"workloads": "x"}], r"exclude\[0\]\.workloads: unknown key"),
    (
        "profile-workload",
        "profiles.small.workloads",
        ["nope"],
        r"profiles\.small\.workloads\[0\]: unknown workload 'nope'",
    ),
    ("profile-key", "profiles.small.models", ["tiny"], r"profiles\.small\.models: unknown key"),
    (
        "profile-args-workload",
        "profiles.small.args",
        {"nope": {}},
        r"profiles\.small\.args\.nope: unknown workload",
    ),
    (
        "profile-args-option",
        "profiles.small.args",
        {"embed": {"step": "1m"}},
        r"profiles\.small\.args\.embed\.step: unknown option; allowed: batch, count, plan, pooling, threads",
    ),
    (
        "command-args",
        "workloads.cmd",
        {"command": ["-c", "pass"], "args": {"count": 1}},
        r"workloads\.cmd\.args: a command takes no args",
    ),
    ("command-type", "workloads.cmd", {"command": "python -c pass"}, r"workloads\.cmd\.command: expected"),
    ("version", "version", 2, r"version: unsupported schema version 2"),
]


@pytest.mark.parametrize(
    ("key_path", "value", "message"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_malformed_matrix_names_the_key(key_path: str, value: Any, message: str) -> None:
    with pytest.raises(MatrixError, match=message):
        build(_set(base_doc(), key_path, value))


def test_load_reports_yaml_errors_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(MatrixError, match="cannot read the matrix file"):
        load(tmp_path / "absent.yaml")
    broken = tmp_path / "matrix.yaml"
    broken.write_text("pythons: [3.11\n")
    with pytest.raises(MatrixError, match="not valid YAML"):
        load(broken)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(MatrixError, match=r"profiles\.nightly: no such profile; known profiles: small"):
        build().with_profile("nightly")


def test_path_models_resolve_against_the_matrix_directory() -> None:
    assert build().models["mine"].options["path"] == "/repo/models/mine.gguf"


# --------------------------------------------------------------------------- expansion


def test_expand_is_the_product_in_a_stable_order() -> None:
    matrix = build()
    cell_ids = ids(matrix)
    # 2 backends × 2 pythons × (parse×2 models + embed + bomb) × 2 memory limits
    assert len(cell_ids) == 2 * 2 * 4 * 2 == len(set(cell_ids))
    assert cell_ids[:4] == [
        "cgroup-py3.11-64m-parse-tiny",
        "cgroup-py3.11-256m-parse-tiny",
        "cgroup-py3.11-64m-parse-mine",
        "cgroup-py3.11-256m-parse-mine",
    ]
    assert "docker-py3.12-256m-bomb" in cell_ids
    assert ids(matrix) == cell_ids


def test_cells_carry_argv_model_timeout_and_repro() -> None:
    cells = {c.cell_id: c for c in expand_cells(build(), cache_dir=CACHE)}
    embed = cells["docker-py3.12-64m-embed-tiny"]
    spec = embed.spec
    assert spec.argv == (
        "-m",
        "gguf_sandbox",
        "workload",
        "embed",
        "--model",
        MODEL_PLACEHOLDER,
        "--count",
        "10",
    )
    assert spec.model is not None and spec.model.parent == CACHE
    assert spec.model.name.startswith("tiny-") and spec.model.suffix == ".gguf"
    assert (spec.backend, spec.python, spec.memory, spec.timeout) == ("docker", "3.12", 64 << 20, 300.0)
    assert embed.reference
    twin = reference_spec(embed, 1 << 30)
    assert twin.cell_id.startswith("docker-py3.12-ref-embed-tiny-") and twin.memory == 1 << 30
    assert embed.repro == (
        "gguf-sandbox repro --python 3.12 --memory 64m --backend docker --workload embed --model tiny"
    )
    bomb = cells["cgroup-py3.11-64m-bomb"].spec
    assert bomb.argv == ("-m", "gguf_sandbox.controls", "alloc-bomb", "--step", "8m")
    assert bomb.model is None
    assert cells["cgroup-py3.11-64m-parse-mine"].spec.model == Path("/repo/models/mine.gguf")
    assert not cells["cgroup-py3.11-64m-parse-mine"].reference


def test_expect_rules_last_match_wins() -> None:
    expects = {c.cell_id: c.expect for c in expand_cells(build(), cache_dir=CACHE)}
    assert expects["cgroup-py3.11-64m-parse-tiny"] == FINISHED
    assert expects["cgroup-py3.11-256m-bomb"] == {Verdict.OOM}
    assert expects["cgroup-py3.12-64m-bomb"] == {Verdict.OOM}
    assert expects["cgroup-py3.12-256m-bomb"] == {Verdict.PASS}


def test_exclude_then_include() -> None:
    doc = base_doc()
    doc["exclude"] = [{"workload": "parse", "model": "mine"}, {"backend": "docker", "memory": "<128m"}]
    doc["include"] = [{"workload": "parse", "model": "mine", "memory": "1g", "python": "3.12"}]
    cell_ids = ids(build(doc))
    assert not [i for i in cell_ids if "parse-mine" in i and "1g" not in i]
    assert not [i for i in cell_ids if i.startswith("docker") and "-64m-" in i]
    assert {i for i in cell_ids if "1g" in i} == {
        "cgroup-py3.12-1g-parse-mine",
        "docker-py3.12-1g-parse-mine",
    }


def test_include_duplicates_are_dropped() -> None:
    doc = base_doc()
    doc["include"] = [{"workload": "bomb", "memory": "64m"}]
    cell_ids = ids(build(doc))
    assert len(cell_ids) == len(set(cell_ids)) == 32


def test_include_naming_every_cell_again_changes_nothing() -> None:
    doc = base_doc()
    doc["include"] = [{"workload": ["parse", "embed", "bomb"]}, {"workload": "embed", "model": "tiny"}]
    assert ids(build(doc)) == ids(build())


# Workload `embed` on model `tiny` and workload `embed-tiny` both gave `…-embed-tiny`: one was dropped.
SAME_ID = r"^workloads: 'embed' on model 'tiny' and 'embed-tiny' \(no model\) give the same cell ids"


def test_two_workloads_with_the_same_cell_ids_are_refused() -> None:
    doc = base_doc()
    doc["workloads"]["embed-tiny"] = {"command": ["-c", "import sys; sys.exit(1)"]}
    with pytest.raises(MatrixError, match=SAME_ID + r" \(…-embed-tiny\); rename one"):
        build(doc)


def test_a_profile_cannot_hide_two_workloads_with_the_same_cell_ids() -> None:
    doc = base_doc()
    doc["workloads"]["embed-tiny"] = {"command": ["-c", "pass"], "default": False}
    doc["profiles"]["other"] = {"workloads": ["embed-tiny"]}
    with pytest.raises(MatrixError, match=SAME_ID):
        build(doc)


def test_a_workload_whose_name_ends_in_another_model_is_no_clash() -> None:
    doc = base_doc()
    doc["workloads"]["parse-tinyx"] = {"command": ["-c", "pass"]}
    assert "cgroup-py3.11-64m-parse-tinyx" in ids(build(doc))


def test_expansion_never_drops_a_cell_that_shares_an_id() -> None:
    clash = base_doc()
    clash["workloads"] = {"embed-tiny": {"command": ["-c", "import sys; sys.exit(1)"]}}
    clash["profiles"] = {}
    matrix = build()
    merged = replace(matrix, workloads=MappingProxyType({**matrix.workloads, **build(clash).workloads}))
    with pytest.raises(MatrixError, match=SAME_ID + r" \(cgroup-py3\.11-64m-embed-tiny\)"):
        expand_cells(merged, cache_dir=CACHE)


def test_include_rejects_unknown_workloads() -> None:
    doc = base_doc()
    doc["include"] = [{"workload": "nope"}]
    with pytest.raises(MatrixError, match=r"include\[0\]\.workload\[0\]: unknown workload 'nope'"):
        ids(build(doc))


def test_backends_argument_and_profile() -> None:
    matrix = build()
    assert {i.split("-")[0] for i in ids(matrix, backends=["docker"])} == {"docker"}
    small = matrix.with_profile("small")
    assert small.profile == "small"
    assert ids(small) == ["cgroup-py3.11-64m-bomb", "cgroup-py3.12-64m-bomb"]
    with pytest.raises(MatrixError, match="backend 'lxc': unknown"):
        ids(matrix, backends=["lxc"])


def test_profile_args_override_the_entry_options() -> None:
    doc = base_doc()
    doc["profiles"]["quick"] = {"args": {"embed": {"count": 3, "batch": 2}, "bomb": {"max": "64m"}}}
    cells = {c.cell_id: c.spec for c in expand_cells(build(doc).with_profile("quick"), cache_dir=CACHE)}
    assert cells["cgroup-py3.11-64m-embed-tiny"].argv[-4:] == ("--count", "3", "--batch", "2")
    assert cells["cgroup-py3.11-64m-bomb"].argv[-4:] == ("--step", "8m", "--max", "64m")
    plain = {c.cell_id: c.spec for c in expand_cells(build(doc), cache_dir=CACHE)}
    assert plain["cgroup-py3.11-64m-embed-tiny"].argv[-2:] == ("--count", "10")


def test_expand_returns_the_specs() -> None:
    specs = expand(build(), backends=["cgroup"], k="bomb", cache_dir=CACHE)
    assert [s.cell_id for s in specs] == [
        "cgroup-py3.11-64m-bomb",
        "cgroup-py3.11-256m-bomb",
        "cgroup-py3.12-64m-bomb",
        "cgroup-py3.12-256m-bomb",
    ]


# --------------------------------------------------------------------------- -k


# --------------------------------------------------------------------------- the shipped matrix.yaml


def test_shipped_matrix_default_and_ci_profile() -> None:
    matrix = load(REPO / "matrix.yaml")
    cells = expand_cells(matrix, cache_dir=CACHE)
    # parse and stream on four models; embed, embed-concurrent, mcp, the four controls on one (or none);
    # embed-decoder and mcp-decoder on two models, Python 3.12 only; `default: false` entries nowhere
    per_backend = 4 * 5 * (4 + 4 + 1 + 1 + 1 + 1 + 1 + 1 + 1) + 2 * 5 * 2
    floor_cells = [c for c in cells if c.memory_label not in ("64m", "96m", "128m", "256m", "512m")]
    assert len(cells) - len(floor_cells) == 2 * per_backend
    assert {c.spec.python for c in cells} == {"3.10", "3.11", "3.12", "3.13"}
    by_id = {c.cell_id: c for c in cells}
    assert by_id["docker-py3.12-64m-embed-minilm_q8_0"].spec.argv[-2:] == ("--count", "1000")
    assert by_id["cgroup-py3.10-96m-mcp-minilm_q8_0"].spec.argv[-2:] == ("--count", "1000")
    finished = {Verdict.PASS, Verdict.DEGRADED}
    controls = {
        "alloc-bomb": {Verdict.OOM},
        "refusing-engine": {Verdict.REFUSED},
        "perturbed-engine": {Verdict.WRONG},
    }
    for cell in cells:
        assert cell.host_side == cell.workload.startswith("mcp")
        assert Verdict.REFUSED not in cell.expect or cell.workload in (
            "mcp",
            "embed",
            "embed-decoder",
            "refusing-engine",
        )
        if cell.workload in controls:
            assert cell.expect == controls[cell.workload]
        elif cell.workload == "naive-load":
            assert cell.expect == ({Verdict.PASS} if cell.spec.memory >= 512 << 20 else {Verdict.OOM})
        elif cell.workload in ("embed", "embed-concurrent", "mcp", "embed-decoder", "mcp-decoder"):
            axes = {"workload": cell.workload, "model": cell.model, "python": cell.spec.python}
            floor = matrix.floor_for({**axes, "backend": cell.spec.backend, "memory": cell.spec.memory})
            assert floor is not None
            assert cell.expect == (GRACEFUL if cell.spec.memory < floor else finished)
        else:
            assert cell.expect == finished
    # The promise: 1000 embeddings at 64 MiB, on every Python and backend.
    assert all(
        by_id[f"{b}-py{p}-64m-embed-minilm_q8_0"].expect == finished
        for b in ("docker", "cgroup")
        for p in matrix.pythons
    )
    ci = expand_cells(load(REPO / "matrix.yaml", profile="ci"), cache_dir=CACHE)
    plain_ci = [c for c in ci if c.memory_label in ("64m", "256m")]
    assert len(plain_ci) == 2 * 4 * 2 * (4 + 1 + 1 + 1 + 1 + 1 + 1)
    assert {c.workload for c in ci} == {
        "parse",
        "embed",
        "mcp",
        "naive-load",
        "alloc-bomb",
        "refusing-engine",
        "perturbed-engine",
    }
    assert {c.spec.argv[-2:] for c in ci if c.workload in ("embed", "mcp")} == {("--count", "100")}
    assert not [c for c in cells if c.workload.endswith("-large")]
    large = expand_cells(load(REPO / "matrix.yaml", profile="large"), cache_dir=CACHE)
    assert {(c.workload, c.model) for c in large} == {
        ("parse-large", "nomic_code_class"),
        ("embed-large", "nomic_code_class"),
        ("mcp-large", "nomic_code_class"),
    }
    assert {c.cell_id for c in large if c.expect == finished} == {
        f"{b}-py3.12-{m}-{w}-nomic_code_class"
        for b in ("docker", "cgroup")
        for w, limits in (
            ("parse-large", ("64m", "128m", "256m")),
            ("embed-large", ("128m", "256m")),
            ("mcp-large", ("256m",)),
        )
        for m in limits
    }


# --------------------------------------------------------------------------- floors and strict expectations


def floor(workload: str, limit: str, python: str = "3.11", backend: str = "cgroup") -> Floor:
    return Floor(workload, "tiny", python, backend, size_at(limit, "test"), None, 1 << 20, 3)


def floored(doc: dict[str, Any] | None = None, *floors: Floor) -> Matrix:
    return parse(doc if doc is not None else base_doc(), base_dir=Path("/repo"), floors=FloorTable(floors))


def test_refused_is_never_a_default() -> None:
    doc = base_doc()
    doc["expect"]["default"] = ["pass", "degraded", "refused"]
    with pytest.raises(MatrixError, match=r"expect\.default: refused is never a default"):
        build(doc)


def test_an_always_refusing_engine_is_outside_every_default_expect() -> None:
    expects = [c.expect for c in expand_cells(build(), cache_dir=CACHE) if c.workload != "bomb"]
    assert expects and all(Verdict.REFUSED not in e for e in expects)


def test_below_a_declared_floor_a_refusal_is_acceptable_at_and_above_it_finishing_is_required() -> None:
    doc = base_doc()
    doc["workloads"]["embed"]["floor"] = "128m"
    expects = {c.cell_id: c.expect for c in expand_cells(build(doc), cache_dir=CACHE)}
    assert expects["cgroup-py3.11-64m-embed-tiny"] == GRACEFUL
    assert expects["cgroup-py3.11-256m-embed-tiny"] == FINISHED


def test_a_measured_floor_below_the_promise_takes_over() -> None:
    doc = base_doc()
    doc["workloads"]["embed"]["floor"] = "128m"
    matrix = floored(doc, floor("embed", "48m"))
    expects = {c.cell_id: c.expect for c in expand_cells(matrix, cache_dir=CACHE)}
    assert expects["cgroup-py3.11-64m-embed-tiny"] == FINISHED
    # Not measured on py3.12/docker: the closest measurement (same Python, then any) stands in.
    assert expects["docker-py3.12-64m-embed-tiny"] == FINISHED


def test_a_measured_floor_above_the_promise_does_not_lower_the_bar() -> None:
    doc = base_doc()
    doc["workloads"]["embed"]["floor"] = "64m"
    matrix = floored(doc, floor("embed", "200m"))
    expects = {c.cell_id: c.expect for c in expand_cells(matrix, cache_dir=CACHE)}
    assert expects["cgroup-py3.11-64m-embed-tiny"] == FINISHED


def test_include_cells_relative_to_each_floor() -> None:
    doc = base_doc()
    doc["include"] = [{"workload": "embed", "memory": ["floor-4m", "floor"], "backend": "cgroup"}]
    matrix = floored(doc, floor("embed", "50m"), floor("embed", "53m", python="3.12"))
    cells = {c.cell_id: c.expect for c in expand_cells(matrix, cache_dir=CACHE)}
    assert cells["cgroup-py3.11-46m-embed-tiny"] == GRACEFUL
    assert cells["cgroup-py3.11-50m-embed-tiny"] == FINISHED
    assert cells["cgroup-py3.12-49m-embed-tiny"] == GRACEFUL
    assert cells["cgroup-py3.12-53m-embed-tiny"] == FINISHED


def test_include_relative_to_a_missing_floor_names_the_key() -> None:
    doc = base_doc()
    doc["include"] = [{"workload": "embed", "memory": "floor-4m"}]
    with pytest.raises(MatrixError, match=r"include\[0\]\.memory: memory relative to a floor"):
        ids(build(doc))


def test_rules_still_override_the_floor() -> None:
    doc = base_doc()
    doc["workloads"]["embed"]["floor"] = "128m"
    doc["expect"]["rules"].append({"match": {"workload": "embed", "memory": "64m"}, "expect": ["oom"]})
    expects = {c.cell_id: c.expect for c in expand_cells(build(doc), cache_dir=CACHE)}
    assert expects["cgroup-py3.11-64m-embed-tiny"] == {Verdict.OOM}


def test_a_matrix_names_its_own_floors_file(tmp_path: Path) -> None:
    from gguf_sandbox.floors import save_floors

    save_floors(FloorTable((floor("embed", "100m"),)), tmp_path / "mine.json")
    doc = base_doc()
    doc["floors"] = "mine.json"
    matrix = parse(doc, base_dir=tmp_path)
    assert (
        matrix.floor_for({"workload": "embed", "model": "tiny", "python": "3.11", "backend": "cgroup"})
        == 100 << 20
    )
    doc["floors"] = "broken.json"
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(MatrixError, match=r"floors: .*not a JSON floors file"):
        parse(doc, base_dir=tmp_path)
    doc["floors"] = "absent.json"
    with pytest.raises(MatrixError, match=r"floors: .*absent.json: no such file"):
        parse(doc, base_dir=tmp_path)


# --------------------------------------------------------------------------- peers


def peer_doc() -> dict[str, Any]:
    doc = base_doc()
    doc["workloads"]["llama"] = {
        "workload": "llama-cpp",
        "args": {"count": 10, "batch": 2},
        "models": ["tiny"],
        "below_floor": ["oom"],
    }
    return doc


def test_peer_cells_install_the_peers_and_are_compared_with_ours_by_cosine() -> None:
    from gguf_sandbox.matrix.agreement import PEER_MIN_COSINE
    from gguf_sandbox.sandbox.wheelhouse import PEER_REQUIREMENTS

    cells = {c.cell_id: c for c in expand_cells(build(peer_doc()), cache_dir=CACHE)}
    peer, ours = cells["cgroup-py3.11-64m-llama-tiny"], cells["cgroup-py3.11-64m-embed-tiny"]
    assert peer.spec.requirements == PEER_REQUIREMENTS and ours.spec.requirements == ()
    assert peer.spec.argv[3] == "llama-cpp" and peer.reference and peer.min_cosine == PEER_MIN_COSINE
    assert ours.reference_argv is None and ours.min_cosine is None
    twin = reference_spec(peer, 2 << 30)
    # The peer's twin is our embed workload, same options, unconstrained, carrying 8 texts' vectors.
    assert twin.argv == (
        *("-m", "gguf_sandbox", "workload", "embed", "--model", MODEL_PLACEHOLDER),
        *("--count", "10", "--batch", "2", "--vectors", "8"),
    )
    assert twin.memory == 2 << 30 and twin.requirements == PEER_REQUIREMENTS
    assert reference_spec(ours, 2 << 30).argv == ours.spec.argv


def test_a_peer_below_its_measured_floor_is_expected_to_be_oom_killed() -> None:
    doc = peer_doc()
    doc["memory"] = ["64m", "96m", "128m", "256m"]
    matrix = floored(doc, Floor("llama", "tiny", "3.11", "cgroup", size_at("100m", "t"), None, 1 << 20, 2))
    expects = {c.cell_id: c.expect for c in expand_cells(matrix, backends=["cgroup"], cache_dir=CACHE)}
    assert expects["cgroup-py3.11-64m-llama-tiny"] == {Verdict.OOM}
    # 4 MiB below the floor (within max(4m, floor/16)) a run may still finish.
    assert expects["cgroup-py3.11-96m-llama-tiny"] == {Verdict.OOM} | FINISHED
    assert expects["cgroup-py3.11-128m-llama-tiny"] == FINISHED
    # Ours declares no below_floor: below a floor it stays graceful (never an OOM kill).
    ours = floored(doc, floor("embed", "100m"))
    cells = {c.cell_id: c.expect for c in expand_cells(ours, backends=["cgroup"], cache_dir=CACHE)}
    assert cells["cgroup-py3.11-64m-embed-tiny"] == GRACEFUL


def test_a_peer_takes_no_plan_or_threads_and_below_floor_takes_verdicts() -> None:
    doc = peer_doc()
    doc["workloads"]["llama"]["args"]["plan"] = "streaming"
    with pytest.raises(MatrixError, match=r"workloads\.llama\.args\.plan: unknown option"):
        build(doc)
    doc = peer_doc()
    doc["workloads"]["llama"]["below_floor"] = ["dead"]
    with pytest.raises(MatrixError, match=r"workloads\.llama\.below_floor\[0\]: unknown verdict 'dead'"):
        build(doc)


def test_the_peers_profile_of_the_repository_matrix() -> None:
    matrix = load(REPO / "matrix.yaml", profile="peers")
    peers = {w.name for w in matrix.workloads.values() if w.peer}
    assert peers == {"llama-cpp", "sentence-transformers", "gguf-py", "llama-cpp-smollm2"}
    below = frozenset({Verdict.OOM, Verdict.TIMEOUT})
    assert all(matrix.workloads[name].below_floor == below for name in peers)
    assert matrix.pythons == ("3.12",)
    # Outside the profile no peer cell runs, and nothing is installed for the default matrix's cells.
    default = load(REPO / "matrix.yaml")
    cells = expand_cells(default, backends=["cgroup"], cache_dir=CACHE)
    assert cells and not any(c.spec.requirements or c.min_cosine for c in cells)


def test_a_peers_own_vectors_are_its_references_too_and_it_carries_at_least_one() -> None:
    """vectors: 3 on a peer gave ours `--vectors 3 --vectors 8` (8 texts) against the peer's 3: one text in
    common judged the peer; vectors: 0 left every peer cell an error (nothing to judge it by)."""
    doc = peer_doc()
    doc["workloads"]["llama"]["args"]["vectors"] = 3
    peer = next(c for c in expand_cells(build(doc), cache_dir=CACHE) if c.workload == "llama")
    twin = reference_spec(peer, 2 << 30)
    assert twin.argv.count("--vectors") == 1 and twin.argv[-2:] == ("--vectors", "3")
    assert peer.spec.argv[-2:] == ("--vectors", "3")
    doc["workloads"]["llama"]["args"]["vectors"] = 0
    with pytest.raises(
        MatrixError, match=r"workloads\.llama\.args\.vectors: 0 is out of range: give a whole number from 1"
    ):
        build(doc)
