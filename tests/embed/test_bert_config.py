"""config.json: a BERT architecture, its fields of the type expected, its counts within bounds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.embed.tiny_checkpoint import bad_checkpoint_test, hostile_input_test, with_config, without

BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-config": (without("config.json"), "config.json is missing"),
    "llama-config": (
        with_config(architectures=["LlamaForCausalLM"], model_type="llama"),
        "not a BERT encoder",
    ),
    "missing-hparam": (with_config(num_hidden_layers=None), "num_hidden_layers"),
    "heads-do-not-divide": (with_config(num_attention_heads=3), "not a multiple"),
    "relative-positions": (with_config(position_embedding_type="relative_key"), "position_embedding_type"),
}


HOSTILE_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    # fields of the wrong type
    "architectures-a-number": (with_config(architectures=5), "architectures is 5, expected an array"),
    "architectures-of-numbers": (with_config(architectures=[5]), "architectures must be an array of strings"),
    "model-type-an-array": (with_config(architectures=None, model_type=["bert"]), "model_type is an array"),
    "hidden-size-true": (with_config(hidden_size=True), "non-integer hidden_size"),
    "type-vocab-size-float": (
        with_config(type_vocab_size=2.0),
        "type_vocab_size is 2.0, expected an integer",
    ),
    "position-type-a-number": (
        with_config(position_embedding_type=1),
        "position_embedding_type is 1, expected",
    ),
    "layer-norm-eps-string": (with_config(layer_norm_eps="x"), "layer_norm_eps is 'x'; it must be a finite"),
    "layer-norm-eps-null": (with_config(layer_norm_eps=None), "layer_norm_eps is null"),
    "layer-norm-eps-true": (with_config(layer_norm_eps=True), "layer_norm_eps is true"),
    "layer-norm-eps-nan": (with_config(layer_norm_eps=float("nan")), "layer_norm_eps is nan; it must be"),
    "layer-norm-eps-inf": (with_config(layer_norm_eps=float("inf")), "layer_norm_eps is inf"),
    "layer-norm-eps-negative": (with_config(layer_norm_eps=-1e-5), "layer_norm_eps is -1e-05"),
    "layer-norm-eps-zero": (with_config(layer_norm_eps=0), "layer_norm_eps is 0"),
    "layer-norm-eps-below-float32": (with_config(layer_norm_eps=1e-50), "float32 can hold"),
    "layer-norm-eps-above-float32": (with_config(layer_norm_eps=1e39), "float32 can hold"),
    "layer-norm-eps-400-digits": (with_config(layer_norm_eps=10**400), "float32 can hold"),
    "layer-norm-epsilon-string": (
        with_config(layer_norm_eps=None, layer_norm_epsilon="1e-12"),
        "layer_norm_eps is null",  # layer_norm_eps wins when present, as in HF configs
    ),
    # counts: bounded before anything is sized by them
    "vocab-size-10**15": (
        with_config(vocab_size=10**15),
        "vocab_size 1000000000000000 is out of range; a BERT",
    ),
    "layers-10**9": (with_config(num_hidden_layers=10**9), "num_hidden_layers 1000000000 is out of range"),
    "layers-1e9": (with_config(num_hidden_layers=1e9), "non-integer num_hidden_layers"),
    "hidden-size-negative": (with_config(hidden_size=-64), "hidden_size -64 is out of range"),
    "heads-zero": (with_config(num_attention_heads=0), "num_attention_heads 0 is out of range"),
    "type-vocab-size-zero": (with_config(type_vocab_size=0), "type_vocab_size 0 is out of range"),
    "positions-2**40": (
        with_config(max_position_embeddings=2**40),
        "max_position_embeddings 1099511627776 is out",
    ),
}


test_bad_checkpoint_is_a_clear_error_and_leaves_no_file = bad_checkpoint_test(BAD_INPUTS)
test_hostile_input_is_one_line_and_changes_nothing = hostile_input_test(HOSTILE_INPUTS)
