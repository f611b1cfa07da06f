"""A BERT encoder held whole in one onnxruntime session: every matrix packed once, the layers run in C++.

resident-f32 held packed (ort_kernel.PackedMatrix) still ran a pass from Python: 18 kernel runs for one
MiniLM text, each waking a sleeping worker, with attention, layer norms and residuals in numpy between
them. This session holds all of a BERT's layers. A text short enough that none of its activations passes
the cap runs through the whole encoder in one call (whole()): one ~22-token MiniLM text in 6.2 ms on 1
thread and 3.6 on 2, against 8.3-8.6 and 7.0-7.3 packed matrix by matrix (issue #15's notes, fused_p50).
A batch of such texts goes in calls of as many of like length as fit, each padded to the longest with
copies of its own first row, padding keys masked: 3-5% faster than layer by layer for 32 texts, 10-26%
for 2 (padded_ab). A longer text goes on its own, a layer in calls per activation chunk (qkv(), then
rest()) and its attention between them in the session too (attend(), head by head), where numpy's
second thread met the session's spinning one; past attend_tokens numpy's attention, its scores within
the cap.

onnxruntime packs a weight once per node that uses it (twice for one in both branches of an If, if_share)
and runs every node of a graph whatever outputs are asked for (issue #15's notes, one_session). So each
matrix has one node, and a call turns on the layers it needs (on.<layer>: an If around the layer; the
others pass no rows on). Within a layer the whole encoder's rows and a part's rows come in by different
inputs; the part a call does not give rows to runs on none. 23 Ifs, one around each part, cost the whole
encoder ~0.5 ms of a 6.1 ms text (whole_if); with no If, a part's call ran the other layers on no rows,
~0.25 ms a call (a 252-token text 80 ms instead of 70-74).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np

from gguf_sandbox.embed import ort_kernel
from gguf_sandbox.embed.bert import BertConfig
from gguf_sandbox.embed.rows import F32, FLOAT_BYTES, rows_per_chunk
from gguf_sandbox.errors import GGUFError, KernelRefused

# Matrices of a layer as the graph holds them: Q, K and V as one [3 hidden, hidden], then the others.
QKV: Final = ("attn_q", "attn_k", "attn_v")
# onnxruntime 1.23's FusedMatMul (a MatMul with its operands' Transposes folded in) divides by zero on no
# rows, which every part's call runs attention on: the process dies of SIGFPE, which nothing can catch
# (issue #15's notes, fpe_level, fpe_ops). Unfused, MiniLM's texts take as long on 1.32 (no_fusedmatmul).
UNFUSED: Final = ("MatmulTransposeFusion",)
# whole()'s padding inputs kept for this many sets of lengths (single texts' lengths, mostly): a few KiB.
PADDINGS_KEPT: Final = 64
OTHER_MATRICES: Final = ("attn_output", "ffn_up", "ffn_down")


def whole_fits(config: BertConfig, cap: int, texts: int, longest: int) -> bool:
    """Whether whole() runs `texts` texts together, the longest `longest` rows, each padded to it: every
    activation ([texts * longest, 3 hidden] Q, K and V, [texts * longest, ffn]) and the attention scores
    [texts, heads, longest, longest] each within the cap."""
    floats = cap // FLOAT_BYTES
    return (
        texts * longest * max(3 * config.hidden, config.ffn) <= floats
        and texts * config.heads * longest * longest <= floats
        and longest <= config.context_length
    )


def whole_tokens(config: BertConfig, cap: int) -> int:
    """The longest text whole() runs (whole_fits for one text)."""
    by_scores = math.isqrt(cap // (FLOAT_BYTES * config.heads))
    by_rows = cap // (FLOAT_BYTES * max(3 * config.hidden, config.ffn))
    return min(by_scores, by_rows, config.context_length)


def attend_tokens(config: BertConfig, cap: int) -> int:
    """The longest text attend() runs: its Q, K and V [T, hidden] each, and one head's scores [T, T], within
    the cap."""
    by_scores = math.isqrt(cap // FLOAT_BYTES)
    by_rows = cap // (FLOAT_BYTES * config.hidden)
    return min(by_scores, by_rows, config.context_length)


def fusable(config: BertConfig, cap: int) -> bool:
    """Whether the session can hold this encoder: a chunk's Q, K and V product ([rows, 3 hidden]) is no
    wider than the widest activation a chunk is sized for (rows_per_chunk)."""
    return 3 * config.hidden <= config.widest and whole_tokens(config, cap) >= 1


def pass_transient(config: BertConfig, cap: int) -> int:
    """Bytes onnxruntime's activations may need during one call, beyond numpy's pass: every activation of
    one layer at once (it frees them as it goes, the previous layer's before the next ends), for whole() on
    its most rows, a rest() call on a full chunk, or attend() on its longest text (the largest)."""
    tokens = cap // (FLOAT_BYTES * max(3 * config.hidden, config.ffn))  # whole_fits' most rows
    hidden, ffn = config.hidden, config.ffn
    # qkv, q/k/v, scaled q, three [texts, heads, longest, d] copies by Transpose, context (3), output,
    # residual, normed, up, GELU, down, residual, out: 20 hidden-wide rows and 2 FFN-wide, at most `tokens`
    # rows (padded: whole_fits); scores, masked scores and probabilities, each within the cap.
    whole = FLOAT_BYTES * tokens * (20 * hidden + 2 * ffn) + 3 * cap
    rest = FLOAT_BYTES * rows_per_chunk(config, cap) * (6 * hidden + 2 * ffn)
    # attend() at its longest: Q, K and V as given, scaled, as [heads, T, d] and split by head, the heads'
    # contexts, joined, as rows and the output (14 hidden-wide rows); one head's scores and probabilities.
    longest = attend_tokens(config, cap)
    attend = FLOAT_BYTES * (14 * longest * hidden + 2 * longest * longest)
    return max(whole, rest, attend)


class FusedBert:
    """A BERT encoder's layers in one session (module docstring): whole() for short texts, several together
    (whole_fits), attend() for one longer text's attention, qkv() and rest() per layer and activation chunk.

    The float32 matrices are filled into private anonymous pages, handed over, and dropped once the session
    has packed its copy (ort_kernel.drop_pages, which refuses a session that reads them again); the bias and
    norm vectors are kept as given. Raises KernelRefused where onnxruntime cannot hold the encoder (no pages
    or threads for it, a process-wide pool it cannot use): the engine then runs numpy's pass instead.
    """

    def __init__(
        self,
        config: BertConfig,
        matrix_blocks: Callable[[str], Iterable[tuple[int, F32]]],
        vectors: Mapping[str, F32],
        *,
        cap: int,
        threads: int,
    ) -> None:
        self.config = config
        self.attend_tokens = attend_tokens(config, cap)
        self._cap = cap
        self._head_dim = config.hidden // config.heads
        # whole()'s padding inputs by the texts' lengths, kept per session (a cache on the class would keep
        # a closed model's session alive).
        self._paddings: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
        hidden, ffn = config.hidden, config.ffn
        if not numpys_layer_norm(threads):
            raise KernelRefused(
                f"onnxruntime {ort_kernel.library('onnxruntime').__version__}'s LayerNormalization gives NaN "
                f"where a row's float32 squares overflow, where numpy's layer norm gives a finite row: the "
                f"encoder is not held whole"
            )
        shapes = {
            "wqkv": (3 * hidden, hidden),
            "wo": (hidden, hidden),
            "wu": (ffn, hidden),
            "wd": (hidden, ffn),
        }
        per_layer = sum(rows * row_len for rows, row_len in shapes.values())
        name = f"the {config.layers}-layer encoder"
        self._pages, flat = ort_kernel.anonymous_floats(name, config.layers * per_layer)
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for layer in range(config.layers):
            for key, (rows, row_len) in shapes.items():
                weight = flat[offset : offset + rows * row_len].reshape(rows, row_len)  # [rows, row_len]
                offset += rows * row_len
                arrays[f"{layer}.{key}"] = weight
            _fill(arrays[f"{layer}.wqkv"], [f"blk.{layer}.{part}.weight" for part in QKV], matrix_blocks)
            for key, part in zip(("wo", "wu", "wd"), OTHER_MATRICES, strict=True):
                _fill(arrays[f"{layer}.{key}"], [f"blk.{layer}.{part}.weight"], matrix_blocks)
            for key, vector in _layer_vectors(vectors, layer).items():
                arrays[f"{layer}.{key}"] = vector
        try:
            self._session, self._values = ort_kernel.open_session(
                _encoder_model(config),
                arrays,
                threads,
                what=f"{name}: onnxruntime's float32 kernels cannot hold it",
                spinning=True,
                disabled=UNFUSED,
            )
        except GGUFError as error:
            raise KernelRefused(str(error)) from None
        del weight, flat, arrays  # the pages' only views besides the session's
        empty = np.zeros((0, hidden), dtype=np.float32)  # [0, hidden]
        self._nothing: dict[str, np.ndarray] = {
            "x": empty,
            "whole_rows": np.zeros(1, dtype=np.int64),
            "keys": np.zeros((0, 1, 1, 0), dtype=np.float32),
            "padded_shape": np.array([0, 0, config.heads, self._head_dim]),
            "padded_rows": np.array([0, hidden]),
        }
        self._nothing.update({f"{kind}.{layer}": empty for layer in range(config.layers) for kind in "qrc"})
        self._on, off = np.array(True), np.array(False)
        self._nothing.update({f"on.{layer}": off for layer in range(config.layers)})
        self._nothing.update({"aq": empty, "ak": empty, "av": empty, "attend": off})
        self._all_on = {f"on.{layer}": self._on for layer in range(config.layers)}
        # Random rows: through every layer, so every matrix takes part; and a part's calls, whose layers run
        # on no rows but one, so a failure there is a refusal now rather than an error in every pass.
        probe = np.random.default_rng(0).standard_normal((2, hidden)).astype(np.float32)  # [2, hidden]
        last = config.layers - 1

        def products() -> F32:
            parts = (
                self.whole(probe),
                self.qkv(last, probe),
                self.rest(last, probe, probe),
                self.attend(probe, probe, probe),
            )
            return np.concatenate([part.reshape(-1) for part in parts])

        ort_kernel.drop_pages(name, self._pages, products)

    def whole(self, x: F32, lengths: Sequence[int] = ()) -> F32:
        """The last layer's output [texts * longest, hidden] for the embedded rows x [texts * longest, hidden]
        of texts `lengths` rows long (one text where not given), each padded to the longest with rows of its
        own (whose outputs mean nothing), within whole_fits. A text's attention reads its own rows only,
        so no text's values reach another's."""
        sizes = tuple(lengths) or (len(x),)
        padding = self._paddings.get(sizes)
        if padding is None:
            if len(self._paddings) >= PADDINGS_KEPT:
                self._paddings.clear()
            padding = self._paddings[sizes] = self._padding(sizes)
        return self._run(f"out.{self.config.layers - 1}", {"x": x, **padding, **self._all_on})

    def _padding(self, lengths: tuple[int, ...]) -> dict[str, np.ndarray]:
        """whole()'s inputs but x for texts of these lengths: padding keys masked, the shapes."""
        longest = max(lengths)
        real = np.arange(longest)[None, :] < np.array(lengths)[:, None]  # [texts, longest]
        return {
            "whole_rows": np.array([len(lengths) * longest]),
            "keys": np.where(real, np.float32(0), np.float32(-np.inf))[:, None, None, :],
            "padded_shape": np.array([len(lengths), longest, self.config.heads, self._head_dim]),
            "padded_rows": np.array([len(lengths) * longest, self.config.hidden]),
        }

    def whole_fits(self, texts: int, longest: int) -> bool:
        """Whether whole() runs these texts together (module function whole_fits)."""
        return whole_fits(self.config, self._cap, texts, longest)

    def attend(self, q: F32, k: F32, v: F32) -> F32:
        """softmax(q k^T / sqrt(d)) v [T, hidden] for one text's Q, K and V [T, hidden] each, T at most
        attend_tokens: one head's scores at a time, on the session's threads."""
        return self._run("ctx", {"aq": q, "ak": k, "av": v, "attend": self._on})

    def qkv(self, layer: int, x: F32) -> F32:
        """Layer `layer`'s Q, K and V side by side [n, 3 hidden] for activation rows x [n, hidden]."""
        return self._run(f"qkv.{layer}", {f"q.{layer}": x, f"on.{layer}": self._on})

    def rest(self, layer: int, ctx: F32, x: F32) -> F32:
        """Layer `layer`'s output [n, hidden] from attention's context ctx and the layer's input x (both
        [n, hidden]): output projection, residual, layer norm, GELU MLP, residual, layer norm."""
        return self._run(f"out.{layer}", {f"c.{layer}": ctx, f"r.{layer}": x, f"on.{layer}": self._on})

    def _run(self, output: str, given: dict[str, np.ndarray]) -> F32:
        """`output` with the inputs `given`, every other input empty (module docstring)."""
        feeds = {**self._nothing, **{name: np.ascontiguousarray(value) for name, value in given.items()}}
        try:
            result: F32 = self._session.run([output], feeds)[0]
        except Exception as error:  # onnxruntime's own exception types (bad_alloc among them)
            rows = max(len(value) for value in given.values() if value.ndim)
            raise GGUFError(
                f"the encoder's float32 kernels failed on {rows} rows: {ort_kernel.failure_words(error)}"
            ) from None
        return result


class _LayerNormCheck:
    """Whether this process's onnxruntime normalizes as numpy does where float32 squares overflow, once
    known (numpys_layer_norm)."""

    answer: bool | None = None


def numpys_layer_norm(threads: int) -> bool:
    """Whether onnxruntime's LayerNormalization gives numpy's answer (bert.layer_norm) for a row whose
    float32 squares overflow: numpy's variance is then infinite and the row becomes its shift, finite.
    onnxruntime 1.23.2 gives NaN there and 1.32 numpy's row, so a weight of 1e30 in an output projection
    made the whole encoder refuse vectors numpy's pass gives (issue #15's notes, ln_probe)."""
    if _LayerNormCheck.answer is None:
        helper = ort_kernel.library("onnx.helper")
        numpy_helper = ort_kernel.library("onnx.numpy_helper")
        float32 = ort_kernel.library("onnx").TensorProto.FLOAT
        width = 8
        norm = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)
        constants = [
            numpy_helper.from_array(np.ones(width, dtype=np.float32), "gamma"),
            numpy_helper.from_array(np.zeros(width, dtype=np.float32), "beta"),
        ]
        graph = helper.make_graph(
            [norm],
            "layer_norm",
            [helper.make_tensor_value_info("x", float32, [1, width])],
            [helper.make_tensor_value_info("y", float32, [1, width])],
            constants,
        )
        opsets = [helper.make_opsetid("", 21)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=ort_kernel.IR_VERSION)
        what = "onnxruntime's layer norm cannot be checked"
        row = np.array([[1e30, -2e30, 3, 0, 1, 2, 3, 4]], dtype=np.float32)  # squares overflow float32
        try:
            session, _ = ort_kernel.open_session(bytes(model.SerializeToString()), {}, threads, what=what)
            normalized = session.run(["y"], {"x": row})[0]
        except GGUFError as error:  # the session could not be made
            raise KernelRefused(str(error)) from None
        except Exception as error:  # onnxruntime's own exception types, from the run
            raise KernelRefused(f"{what}: {ort_kernel.failure_words(error)}") from None
        _LayerNormCheck.answer = bool(np.isfinite(normalized).all())
    return _LayerNormCheck.answer


def _fill(weight: F32, names: list[str], matrix_blocks: Callable[[str], Iterable[tuple[int, F32]]]) -> None:
    """Rows of the matrices `names`, one under the other, into `weight`, a block at a time."""
    first = 0
    for matrix in names:
        rows = 0
        for lo, block in matrix_blocks(matrix):  # block [n, row_len]
            weight[first + lo : first + lo + block.shape[0]] = block
            rows = max(rows, lo + block.shape[0])
        first += rows


def _layer_vectors(vectors: Mapping[str, F32], layer: int) -> dict[str, F32]:
    """A layer's biases (Q, K and V's as one) and layer norm scales and shifts, by their graph names."""
    prefix = f"blk.{layer}"

    def vector(name: str) -> F32:
        return np.ascontiguousarray(vectors[f"{prefix}.{name}"], dtype=np.float32)

    return {
        "bqkv": np.concatenate([vector(f"{part}.bias") for part in QKV]),
        "bo": vector("attn_output.bias"),
        "bu": vector("ffn_up.bias"),
        "bd": vector("ffn_down.bias"),
        "g1": vector("attn_output_norm.weight"),
        "b1": vector("attn_output_norm.bias"),
        "g2": vector("layer_output_norm.weight"),
        "b2": vector("layer_output_norm.bias"),
    }


class _Graph:
    """The encoder's nodes and the constants they use, built layer by layer (_encoder_model)."""

    def __init__(self, config: BertConfig) -> None:
        self.helper = ort_kernel.library("onnx.helper")
        self.proto = ort_kernel.library("onnx").TensorProto
        numpy_helper = ort_kernel.library("onnx.numpy_helper")
        self.config = config
        hidden, heads = config.hidden, config.heads
        # Shapes whose first 0 copies the input's rows: a -1 there cannot be inferred for no rows.
        constants = {
            "heads_shape": np.array([0, heads, hidden // heads], dtype=np.int64),
            "rows_shape": np.array([0, hidden], dtype=np.int64),
            "scale": np.array([1.0 / math.sqrt(hidden // heads)], dtype=np.float32),
            "first_row": np.zeros(1, dtype=np.int64),
            "row_axis": np.zeros(1, dtype=np.int64),
            "no_rows": np.zeros((0, hidden), dtype=np.float32),
            "no_qkv_rows": np.zeros((0, 3 * hidden), dtype=np.float32),
        }
        self.initializers = [numpy_helper.from_array(value, name) for name, value in constants.items()]
        self.nodes: list[Any] = []

    def add(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        domain = attributes.pop("domain", None)
        self.nodes.append(self.helper.make_node(op, inputs, [output], domain=domain, **attributes))
        return output

    def whole_rows_of(self, name: str) -> str:
        """The rows of `name` a whole-encoder call runs (all of them), none in a part's call."""
        return self.add("Slice", [name, "first_row", "whole_rows", "row_axis"], f"{name}.whole")

    def attention(self, layer: int, qkv: str) -> str:
        """softmax(q k^T / sqrt(d)) v for each text of a whole-encoder call, from Q, K and V side by side, the
        rows of each text padded to the longest's (padding keys masked to -inf); q is scaled before its
        product, as bert._attend does."""
        p, add = f"{layer}.", self.add
        self.nodes.append(
            self.helper.make_node("Split", [qkv], [f"{p}q", f"{p}k", f"{p}v"], axis=1, num_outputs=3)
        )
        # The shapes are given whole (allowzero): a part's call gives [0, 0, heads, d] for no texts.
        given = {"allowzero": 1}
        q_scaled = add("Mul", [f"{p}q", "scale"], f"{p}q_scaled")
        q_rows = add("Reshape", [q_scaled, "padded_shape"], f"{p}q_rows", **given)
        q_heads = add("Transpose", [q_rows], f"{p}q_heads", perm=[0, 2, 1, 3])  # [texts, heads, longest, d]
        k_rows = add("Reshape", [f"{p}k", "padded_shape"], f"{p}k_rows", **given)
        k_heads = add("Transpose", [k_rows], f"{p}k_heads", perm=[0, 2, 3, 1])  # [texts, heads, d, longest]
        v_rows = add("Reshape", [f"{p}v", "padded_shape"], f"{p}v_rows", **given)
        v_heads = add("Transpose", [v_rows], f"{p}v_heads", perm=[0, 2, 1, 3])  # [texts, heads, longest, d]
        scores = add("MatMul", [q_heads, k_heads], f"{p}scores")  # [texts, heads, longest, longest]
        masked = add("Add", [scores, "keys"], f"{p}masked")  # padding keys -inf
        weights = add("Softmax", [masked], f"{p}weights", axis=-1)
        context = add("MatMul", [weights, v_heads], f"{p}context_heads")  # [texts, heads, longest, d]
        rows = add(
            "Transpose", [context], f"{p}context_rows", perm=[0, 2, 1, 3]
        )  # [texts, longest, heads, d]
        return add("Reshape", [rows, "padded_rows"], f"{p}context", **given)  # [texts * longest, hidden]

    def attention_by_head(self) -> None:
        """Attention alone for one text's Q, K and V (aq, ak, av) into ctx, run where `attend`: head by head,
        so one head's scores [T, T] are held at a time (onnxruntime runs each head's nodes before the next's,
        depth first from the Concat), and no weights, so no layer is involved."""
        outer, self.nodes = self.nodes, []
        heads, add = self.config.heads, self.add
        q_rows = add("Reshape", [add("Mul", ["aq", "scale"], "a.q_scaled"), "heads_shape"], "a.q_rows")
        k_rows = add("Reshape", ["ak", "heads_shape"], "a.k_rows")
        v_rows = add("Reshape", ["av", "heads_shape"], "a.v_rows")
        q_heads = add("Transpose", [q_rows], "a.q_heads", perm=[1, 0, 2])  # [heads, T, d]
        k_heads = add("Transpose", [k_rows], "a.k_heads", perm=[1, 2, 0])  # [heads, d, T]
        v_heads = add("Transpose", [v_rows], "a.v_heads", perm=[1, 0, 2])  # [heads, T, d]
        for name in (q_heads, k_heads, v_heads):
            self.nodes.append(
                self.helper.make_node(
                    "Split", [name], [f"{name}.{h}" for h in range(heads)], axis=0, num_outputs=heads
                )
            )
        contexts = []
        for h in range(heads):
            scores = add("MatMul", [f"{q_heads}.{h}", f"{k_heads}.{h}"], f"a.scores.{h}")  # [1, T, T]
            weights = add("Softmax", [scores], f"a.weights.{h}", axis=-1)
            contexts.append(add("MatMul", [weights, f"{v_heads}.{h}"], f"a.context.{h}"))  # [1, T, d]
        joined = add("Concat", contexts, "a.context_heads", axis=0)  # [heads, T, d]
        rows = add("Transpose", [joined], "a.context_rows", perm=[1, 0, 2])  # [T, heads, d]
        add("Reshape", [rows, "rows_shape"], "a.ctx")  # [T, hidden]
        body, self.nodes = self.nodes, outer
        value = self.helper.make_tensor_value_info
        float32 = self.proto.FLOAT
        then = self.helper.make_graph(body, "attend", [], [value("a.ctx", float32, None)])
        otherwise = self.helper.make_graph(
            [self.helper.make_node("Identity", ["no_rows"], ["a.no_ctx"])],
            "no_attend",
            [],
            [value("a.no_ctx", float32, None)],
        )
        self.nodes.append(
            self.helper.make_node("If", ["attend"], ["ctx"], then_branch=then, else_branch=otherwise)
        )

    def layer(self, layer: int) -> None:
        """Layer `layer`, run where on.<layer> (a call on the whole encoder, or on one of its parts); else
        its outputs qkv.<layer> and out.<layer> have no rows, and the next layer runs on its own inputs."""
        outer, self.nodes = self.nodes, []
        self.layer_nodes(layer)
        body, self.nodes = self.nodes, outer
        p = f"{layer}."
        value = self.helper.make_tensor_value_info
        float32 = self.proto.FLOAT
        then = self.helper.make_graph(
            body, f"{p}on", [], [value(f"{p}qkv", float32, None), value(f"{p}out", float32, None)]
        )
        passed = [
            self.helper.make_node("Identity", ["no_qkv_rows"], [f"{p}no_qkv"]),
            self.helper.make_node("Identity", ["no_rows"], [f"{p}no_out"]),
        ]
        otherwise = self.helper.make_graph(
            passed, f"{p}off", [], [value(f"{p}no_qkv", float32, None), value(f"{p}no_out", float32, None)]
        )
        self.nodes.append(
            self.helper.make_node(
                "If",
                [f"on.{layer}"],
                [f"qkv.{layer}", f"out.{layer}"],
                then_branch=then,
                else_branch=otherwise,
            )
        )

    def layer_nodes(self, layer: int) -> None:
        """Layer `layer`'s nodes. Its input is the previous layer's output (the whole encoder) or q.<layer>
        (its Q, K and V product); the rest of it reads attention's context and its input (the whole
        encoder) or c.<layer> and r.<layer>. A call gives rows to one of these: the others run on none."""
        p, add = f"{layer}.", self.add
        eps = self.config.layer_norm_eps
        previous = "x" if layer == 0 else f"out.{layer - 1}"
        x = add("Concat", [previous, f"q.{layer}"], f"{p}x", axis=0)
        qkv = add("Gemm", [x, f"{p}wqkv", f"{p}bqkv"], f"{p}qkv", transB=1)
        context = self.attention(layer, self.whole_rows_of(qkv))
        ctx = add("Concat", [context, f"c.{layer}"], f"{p}ctx", axis=0)
        residual = add("Concat", [self.whole_rows_of(x), f"r.{layer}"], f"{p}residual", axis=0)
        projected = add("Gemm", [ctx, f"{p}wo", f"{p}bo"], f"{p}projected", transB=1)
        attended = add("Add", [projected, residual], f"{p}attended")
        normed = add("LayerNormalization", [attended, f"{p}g1", f"{p}b1"], f"{p}normed", axis=-1, epsilon=eps)
        up = add("Gemm", [normed, f"{p}wu", f"{p}bu"], f"{p}up", transB=1)
        # com.microsoft's Gelu is erf's, as gelu.py's is (ort_kernel._model).
        activated = add("Gelu", [up], f"{p}activated", domain="com.microsoft")
        down = add("Gemm", [activated, f"{p}wd", f"{p}bd"], f"{p}down", transB=1)
        fed = add("Add", [down, normed], f"{p}fed")
        add("LayerNormalization", [fed, f"{p}g2", f"{p}b2"], f"{p}out", axis=-1, epsilon=eps)


def _encoder_model(config: BertConfig) -> bytes:
    """The encoder's graph (module docstring): inputs x [T, hidden], whole_rows [1] (T; 0 for a part) and
    mask [T, T] (added to every head's attention scores),
    q.<layer>, c.<layer> and r.<layer> [rows, hidden]; outputs qkv.<layer> and out.<layer>. Its matrices
    and vectors are external initializers."""
    graph = _Graph(config)
    hidden, ffn = config.hidden, config.ffn
    external = ort_kernel.external_initializer
    float32 = graph.proto.FLOAT
    weights = []
    graph.attention_by_head()
    for layer in range(config.layers):
        graph.layer(layer)
        p = f"{layer}."
        for key, dims in (
            ("wqkv", [3 * hidden, hidden]),
            ("wo", [hidden, hidden]),
            ("wu", [ffn, hidden]),
            ("wd", [hidden, ffn]),
            ("bqkv", [3 * hidden]),
            ("bo", [hidden]),
            ("bu", [ffn]),
            ("bd", [hidden]),
            ("g1", [hidden]),
            ("b1", [hidden]),
            ("g2", [hidden]),
            ("b2", [hidden]),
        ):
            weights.append(external(f"{p}{key}", float32, dims))
    helper = graph.helper
    value = helper.make_tensor_value_info
    outputs = [
        value(f"{kind}.{layer}", float32, None) for layer in range(config.layers) for kind in ("qkv", "out")
    ]
    outputs.append(value("ctx", float32, None))
    rows = [
        value(f"{kind}.{layer}", float32, [f"{kind}{layer}_rows", hidden])
        for layer in range(config.layers)
        for kind in "qrc"
    ]
    switches = [value(f"on.{layer}", graph.proto.BOOL, []) for layer in range(config.layers)]
    switches.append(value("attend", graph.proto.BOOL, []))
    rows += [value(name, float32, ["attend_rows", hidden]) for name in ("aq", "ak", "av")]
    inputs = [
        value("x", float32, ["rows", hidden]),
        value("whole_rows", graph.proto.INT64, [1]),
        value("keys", float32, ["texts", 1, 1, "longest"]),
        value("padded_shape", graph.proto.INT64, [4]),
        value("padded_rows", graph.proto.INT64, [2]),
        *rows,
        *switches,
    ]
    model_graph = helper.make_graph(graph.nodes, "encoder", inputs, outputs, graph.initializers + weights)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(model_graph, opset_imports=opsets, ir_version=ort_kernel.IR_VERSION)
    return bytes(model.SerializeToString())
