"""OPT: LayerNorm decoder with learned positions (offset 2), a ReLU MLP and biased projections.

Residual group S_d x {±1} (LayerNorm: gains permuted, biases signed by the global sign). ``embed_tokens`` and
``embed_positions`` (``[max_positions + 2, d]``: the offset only shifts which rows are read) add into the residual:
columns signed-permuted. MLP ``fc2(relu(fc1 x))``: ReLU is not odd, so units permute with no signs. Heads permute as
wholes (no KV sharing, no rotary).

Two layouts are variants of this spec (``ArchSpec.variant``, resolved per config):
- ``word_embed_proj_dim`` p != ``hidden_size`` d (OPT-350m): tokens are embedded in a p-dimensional space,
  ``project_in [d, p]`` writes them into the residual (rows signed-permuted) and ``project_out [p, d]`` reads the
  final residual back into p-space (columns). ``embed_tokens [vocab, p]``, ``lm_head [vocab, p]`` and the task heads
  (which read ``word_embed_proj_dim`` features) live in p-space, which no residual gauge reaches: untouched. The
  residual's embedding site is then ``project_in`` (its output is the residual chart).
- ``do_layer_norm_before=False`` (post-LayerNorm, OPT-350m): ``h <- LN(h + attn(h))``, ``h <- LN(h + mlp(h))``.
  The sublayers read the raw residual (readers as ever) and ``LN(s P z) = s P LN(z)`` with gain ``P g`` and bias
  ``s P b``: the group stays S_d x {±1} and every rule is the same. There is no final LayerNorm: the last block's
  ``final_layer_norm`` ends the stream, so it is the final-norm site (fingerprint, canonical keys).
Declared fields: ``layer_norm_elementwise_affine`` (the chart's fingerprint and canonical keys read the final
LayerNorm's gain) and ``_remove_final_layer_norm`` (a pre-LN OPT without its final LayerNorm has no final gain).
``activation_function`` needs no declaration (unsigned unit permutations commute with every elementwise
activation), ``enable_bias`` neither (every bias has a rule).
"""
from __future__ import annotations

from functools import cache

from .base import UNTOUCHED, ArchSpec, Axis, Requires, Rule, Sites, reads, writes
from .decoder import HEAD_RULES, head_dim
from .layernorm import layernorm_rules, layernorm_spaces

D = "model.decoder."
L = D + "layers.{i}."
HEAD_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim")
HEAD_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")
MLP_ROWS = Axis(0, "mlp.{i}", signed=False)
MLP_COLS = Axis(1, "mlp.{i}", signed=False)
_HEADS = ("score", "classifier", "qa_outputs")
_REQUIRES = (
    Requires("layer_norm_elementwise_affine", (True,),
             "the chart's fingerprint and canonical order read the final LayerNorm's gain, which an OPT without "
             "affine LayerNorms lacks"),
    Requires("_remove_final_layer_norm", (False,),
             "a pre-LayerNorm OPT without its final LayerNorm has no final gain to fingerprint the chart by"),
)


def _rules(projected: bool) -> tuple[Rule, ...]:
    p_space = UNTOUCHED if projected else reads()          # embed_tokens, lm_head, task heads: p-space if projected
    return (
        Rule(D + "embed_tokens.weight", p_space),
        Rule(D + "embed_positions.weight", reads()),
        Rule(D + "project_in.weight", writes()),           # [d, p]: writes the residual
        Rule(D + "project_out.weight", reads()),           # [p, d]: reads it
        *layernorm_rules(L + "self_attn_layer_norm", L + "final_layer_norm", D + "final_layer_norm"),
        *(Rule(L + f"self_attn.{p}_proj.{w}", reads(HEAD_ROWS) if w == "weight" else (HEAD_ROWS,))
          for p in "qkv" for w in ("weight", "bias")),
        Rule(L + "self_attn.out_proj.weight", writes(HEAD_COLS)),
        Rule(L + "self_attn.out_proj.bias", writes()),
        Rule(L + "fc1.weight", reads(MLP_ROWS)),
        Rule(L + "fc1.bias", (MLP_ROWS,)),
        Rule(L + "fc2.weight", writes(MLP_COLS)),
        Rule(L + "fc2.bias", writes()),
        Rule("lm_head.weight", p_space),
        *(tuple(Rule(f"{h}.{w}", UNTOUCHED) for h in _HEADS for w in ("weight", "bias")) if projected
          else HEAD_RULES),
    )


@cache
def _layout(projected: bool, final_norm: str) -> ArchSpec:
    return ArchSpec(
        name="opt",
        model_types=("opt",),
        norm="layernorm",
        spaces=layernorm_spaces(lambda c: c.ffn_dim, "MLP hidden units of layer i (ReLU: no signs)"),
        rules=_rules(projected),
        dims=head_dim,
        sites=Sites(layers=D + "layers", final_norm=final_norm,
                    embed=D + ("project_in" if projected else "embed_tokens"),
                    inputs={"mlp.{i}": L + "fc2", "attn.{i}": L + "self_attn.out_proj"}),
        requires=_REQUIRES,
        variant=_variant,
    )


def _variant(c) -> ArchSpec:
    projected = (c.word_embed_proj_dim or c.hidden_size) != c.hidden_size
    post_ln = not c.do_layer_norm_before
    final = f"{D}layers.{c.num_hidden_layers - 1}.final_layer_norm" if post_ln else D + "final_layer_norm"
    return _layout(projected, final)


OPT = _layout(False, D + "final_layer_norm")
