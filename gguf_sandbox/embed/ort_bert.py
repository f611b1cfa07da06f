"""A BERT encoder held whole in one onnxruntime session: every matrix packed once, the layers run in C++.

resident-f32 held packed (ort_kernel.PackedMatrix) still ran a pass from Python: 18 kernel runs for one
MiniLM text, each waking a sleeping worker, with attention, layer norms and residuals in numpy between
them. This session holds all of a BERT's layers. A text short enough that none of its activations passes
the cap runs through the whole encoder in one call (whole()): one ~22-token MiniLM text in 6.1 ms on 1
thread and 3.6-3.8 on 2, against 8.3-8.6 and 7.0-7.3 packed matrix by matrix (issue #15's notes,
whole_if). Longer texts and batches run a layer in two calls per activation chunk (qkv(), then rest()),
numpy's attention between them keeping its scores within the cap: 6.9 and 4.4 ms for the same text.

Each matrix is used by one node of the graph, inside an If that the `part` input turns on: onnxruntime packs
a weight once per node that uses it (twice for a weight in both branches of an If, if_share), and runs every
node of a graph whatever outputs are asked for (issue #15's notes, one_session), so the parts a call does
not ask for pass empty tensors instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import numpy as np

from gguf_sandbox.embed import ort_kernel
from gguf_sandbox.embed.bert import BertConfig
from gguf_sandbox.embed.rows import F32, FLOAT_BYTES, rows_per_chunk
from gguf_sandbox.errors import GGUFError, KernelRefused

# `part`: the whole encoder; 2 l is layer l's Q, K and V product, 2 l + 1 the rest of layer l.
WHOLE: Final = -1
# Matrices of a layer as the graph holds them: Q, K and V as one [3 hidden, hidden], then the others.
QKV: Final = ("attn_q", "attn_k", "attn_v")
OTHER_MATRICES: Final = ("attn_output", "ffn_up", "ffn_down")


def whole_tokens(config: BertConfig, cap: int) -> int:
    """The longest text whole() runs: all heads' attention scores [heads, T, T], and every activation
    ([T, 3 hidden] Q, K and V, [T, ffn]), each within the cap."""
    by_scores = math.isqrt(cap // (FLOAT_BYTES * config.heads))
    by_rows = cap // (FLOAT_BYTES * max(3 * config.hidden, config.ffn))
    return min(by_scores, by_rows, config.context_length)


def fusable(config: BertConfig, cap: int) -> bool:
    """Whether the session can hold this encoder: a chunk's Q, K and V product ([rows, 3 hidden]) is no
    wider than the widest activation a chunk is sized for (rows_per_chunk)."""
    return 3 * config.hidden <= config.widest and whole_tokens(config, cap) >= 1


def pass_transient(config: BertConfig, cap: int) -> int:
    """Bytes onnxruntime's activations may need during one call, beyond numpy's pass: every activation of
    one layer at once (it frees them as it goes, the previous layer's before the next ends), for whole() at
    its longest text or a rest() call on a full chunk (the larger)."""
    tokens = whole_tokens(config, cap)
    hidden, ffn = config.hidden, config.ffn
    # qkv, q/k/v, scaled q, three [heads, T, d] views copied by Transpose, context (3), output, residual,
    # normed, up, GELU, down, residual, out: 20 hidden-wide rows and 2 FFN-wide; scores and probabilities.
    whole = FLOAT_BYTES * (tokens * (20 * hidden + 2 * ffn) + 2 * config.heads * tokens * tokens)
    rest = FLOAT_BYTES * rows_per_chunk(config, cap) * (6 * hidden + 2 * ffn)
    return max(whole, rest)


class FusedBert:
    """A BERT encoder's layers in one session (module docstring): whole() for a text up to `whole_tokens`,
    qkv() and rest() per layer and activation chunk for anything else.

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
        self.whole_tokens = whole_tokens(config, cap)
        hidden, ffn = config.hidden, config.ffn
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
            )
        except GGUFError as error:
            raise KernelRefused(str(error)) from None
        del weight, flat, arrays  # the pages' only views besides the session's
        self._empty = np.zeros((0, hidden), dtype=np.float32)  # [0, hidden]: a part's unused input
        # Random rows: through every layer, so every matrix takes part.
        probe = np.random.default_rng(0).standard_normal((2, hidden)).astype(np.float32)  # [2, hidden]
        ort_kernel.drop_pages(name, self._pages, lambda: self.whole(probe))

    def whole(self, x: F32) -> F32:
        """The last layer's output [T, hidden] for one text's embedded rows x [T, hidden] (no padding rows:
        attention reads them all), T at most whole_tokens."""
        return self._run(f"out.{self.config.layers - 1}", x, self._empty, WHOLE)

    def qkv(self, layer: int, x: F32) -> F32:
        """Layer `layer`'s Q, K and V side by side [n, 3 hidden] for activation rows x [n, hidden]."""
        return self._run(f"qkv.{layer}", x, self._empty, 2 * layer)

    def rest(self, layer: int, ctx: F32, x: F32) -> F32:
        """Layer `layer`'s output [n, hidden] from attention's context ctx and the layer's input x (both
        [n, hidden]): output projection, residual, layer norm, GELU MLP, residual, layer norm."""
        return self._run(f"out.{layer}", x, ctx, 2 * layer + 1)

    def _run(self, output: str, x: F32, ctx: F32, part: int) -> F32:
        feeds = {"x": np.ascontiguousarray(x), "ctx": np.ascontiguousarray(ctx), "part": np.array(part)}
        try:
            result: F32 = self._session.run([output], feeds)[0]
        except Exception as error:  # onnxruntime's own exception types (bad_alloc among them)
            raise GGUFError(
                f"the encoder's float32 kernels failed on {len(x)} rows: {ort_kernel.failure_words(error)}"
            ) from None
        return result


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
        constants = {
            "heads_shape": np.array([-1, heads, hidden // heads], dtype=np.int64),
            "rows_shape": np.array([-1, hidden], dtype=np.int64),
            "scale": np.array([1.0 / math.sqrt(hidden // heads)], dtype=np.float32),
            "whole_part": np.array(WHOLE, dtype=np.int64),
            "no_rows": np.zeros((0, hidden), dtype=np.float32),
            "no_qkv_rows": np.zeros((0, 3 * hidden), dtype=np.float32),
        }
        self.initializers = [numpy_helper.from_array(value, name) for name, value in constants.items()]
        self.nodes: list[Any] = [self.node("Equal", ["part", "whole_part"], "whole")]
        self._numpy_helper = numpy_helper

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> Any:
        domain = attributes.pop("domain", None)
        return self.helper.make_node(op, inputs, [output], domain=domain, **attributes)

    def branch(self, name: str, nodes: list[Any], output: str) -> Any:
        """A subgraph of `nodes` whose result is `output` (it reads outer values by name)."""
        return self.helper.make_graph(
            nodes, name, [], [self.helper.make_tensor_value_info(output, self.proto.FLOAT, None)]
        )

    def either(self, condition: str, output: str, then: tuple[list[Any], str], otherwise: str) -> None:
        """output = then's result where `condition`, else the value `otherwise` (passed through)."""
        nodes, result = then
        passed = self.node("Identity", [otherwise], f"{output}.passed")
        self.nodes.append(
            self.node(
                "If",
                [condition],
                output,
                then_branch=self.branch(f"{output}.then", nodes, result),
                else_branch=self.branch(f"{output}.else", [passed], f"{output}.passed"),
            )
        )

    def constant(self, name: str, value: int) -> str:
        self.initializers.append(self._numpy_helper.from_array(np.array(value, dtype=np.int64), name))
        return name

    def attention(self, layer: int) -> tuple[list[Any], str]:
        """softmax(q k^T / sqrt(d)) v over all heads of the whole text, from layer's Q, K and V; q is scaled
        before its product, as bert._attend does."""
        p = f"{layer}."
        n = self.node
        nodes = [
            self.helper.make_node("Split", [f"{p}qkv"], [f"{p}q", f"{p}k", f"{p}v"], axis=1, num_outputs=3),
            n("Mul", [f"{p}q", "scale"], f"{p}q_scaled"),
            n("Reshape", [f"{p}q_scaled", "heads_shape"], f"{p}q_rows"),
            n("Transpose", [f"{p}q_rows"], f"{p}q_heads", perm=[1, 0, 2]),  # [heads, T, d]
            n("Reshape", [f"{p}k", "heads_shape"], f"{p}k_rows"),
            n("Transpose", [f"{p}k_rows"], f"{p}k_heads", perm=[1, 2, 0]),  # [heads, d, T]
            n("Reshape", [f"{p}v", "heads_shape"], f"{p}v_rows"),
            n("Transpose", [f"{p}v_rows"], f"{p}v_heads", perm=[1, 0, 2]),  # [heads, T, d]
            n("MatMul", [f"{p}q_heads", f"{p}k_heads"], f"{p}scores"),  # [heads, T, T]
            n("Softmax", [f"{p}scores"], f"{p}weights", axis=-1),
            n("MatMul", [f"{p}weights", f"{p}v_heads"], f"{p}context_heads"),  # [heads, T, d]
            n("Transpose", [f"{p}context_heads"], f"{p}context_rows", perm=[1, 0, 2]),  # [T, heads, d]
            n("Reshape", [f"{p}context_rows", "rows_shape"], f"{p}context"),  # [T, hidden]
        ]
        return nodes, f"{p}context"

    def rest(self, layer: int, ctx: str, x: str) -> tuple[list[Any], str]:
        """Output projection, residual and layer norm; GELU MLP, residual and layer norm (post-LN BERT)."""
        p = f"{layer}."
        n = self.node
        eps = self.config.layer_norm_eps
        nodes = [
            n("Gemm", [ctx, f"{p}wo", f"{p}bo"], f"{p}projected", transB=1),
            n("Add", [f"{p}projected", x], f"{p}attended"),
            n("LayerNormalization", [f"{p}attended", f"{p}g1", f"{p}b1"], f"{p}normed", axis=-1, epsilon=eps),
            n("Gemm", [f"{p}normed", f"{p}wu", f"{p}bu"], f"{p}up", transB=1),
            # com.microsoft's Gelu is erf's, as gelu.py's is (ort_kernel._model).
            n("Gelu", [f"{p}up"], f"{p}activated", domain="com.microsoft"),
            n("Gemm", [f"{p}activated", f"{p}wd", f"{p}bd"], f"{p}down", transB=1),
            n("Add", [f"{p}down", f"{p}normed"], f"{p}fed"),
            n("LayerNormalization", [f"{p}fed", f"{p}g2", f"{p}b2"], f"{p}out", axis=-1, epsilon=eps),
        ]
        return nodes, f"{p}out"

    def layer(self, layer: int) -> None:
        """Layer `layer`: each part runs where the whole encoder or that part is asked for."""
        p = f"{layer}."
        n = self.node
        for part, offset in (("qkv", 0), ("rest", 1)):
            index = self.constant(f"{p}{part}_part", 2 * layer + offset)
            self.nodes.append(n("Equal", ["part", index], f"{p}{part}_asked"))
            self.nodes.append(n("Or", ["whole", f"{p}{part}_asked"], f"{p}{part}_runs"))
        x = f"{p}x"
        if layer == 0:
            self.nodes.append(n("Identity", ["x"], x))
        else:  # the previous layer's output on the whole encoder, else the rows given
            previous = f"out.{layer - 1}"
            self.either("whole", x, ([n("Identity", [previous], f"{p}previous")], f"{p}previous"), "x")
        qkv_product = n("Gemm", [x, f"{p}wqkv", f"{p}bqkv"], f"{p}qkv_product", transB=1)
        self.either(f"{p}qkv_runs", f"{p}qkv", ([qkv_product], f"{p}qkv_product"), "no_qkv_rows")
        self.nodes.append(n("Identity", [f"{p}qkv"], f"qkv.{layer}"))
        self.either("whole", f"{p}ctx", self.attention(layer), "ctx")
        self.either(f"{p}rest_runs", f"out.{layer}", self.rest(layer, f"{p}ctx", x), "no_rows")


def _encoder_model(config: BertConfig) -> bytes:
    """The encoder's graph (module docstring): inputs x [rows, hidden], ctx [rows or 0, hidden] and part;
    outputs qkv.<layer> and out.<layer>. Its matrices and vectors are external initializers."""
    graph = _Graph(config)
    hidden, ffn = config.hidden, config.ffn
    external = ort_kernel.external_initializer
    float32 = graph.proto.FLOAT
    weights = []
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
    inputs = [
        value("x", float32, ["rows", hidden]),
        value("ctx", float32, ["context_rows", hidden]),
        value("part", graph.proto.INT64, []),
    ]
    model_graph = helper.make_graph(graph.nodes, "encoder", inputs, outputs, graph.initializers + weights)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(model_graph, opset_imports=opsets, ir_version=ort_kernel.IR_VERSION)
    return bytes(model.SerializeToString())
