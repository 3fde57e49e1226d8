"""Rule builders shared by the pre-RMSNorm SwiGLU/GeGLU decoders (Gemma, Granite, SmolLM3, OLMo2 spec files).

Every builder returns ``Rule`` data for one decoder layout; the spec files state each architecture's group.
Conventions as in ``llama.py``: MLP units permute with signs on the (up row, down column) pair only (the gate's
activation is not odd), query heads permute within KV groups and KV groups as wholes (``block="head_dim"``).
"""
from __future__ import annotations

from .base import UNTOUCHED, Axis, Requires, Rule, gain, reads, writes

MLP = Axis(0, "mlp.{i}")                       # up_proj rows (and bias): signed
MLP_GATE = Axis(0, "mlp.{i}", signed=False)    # gate_proj rows (and bias): permute only
MLP_IN = Axis(1, "mlp.{i}")                    # down_proj columns: signed
Q_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim")
KV_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim", kv=True)
O_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")

# Declared config fields (``ArchSpec.requires``), read against each modeling file's MLP and norm.
SILU_GATE = Requires("hidden_act", ("silu", "swish"),
                     "the MLP is act(gate_proj x) * up_proj x with the SiLU gate this layout was derived and tested "
                     "for: unit signs ride on the linear up/down pair only; another activation means another MLP "
                     "(arcee's relu2 has no gate, and relu2 is not odd, so a unit's sign is no symmetry there)")
RMSNORM = Requires("rms_norm_eps", (float,),
                   "RMSNorm does not mean-centre, so every residual sign commutes with it (B_d); a config without "
                   "rms_norm_eps normalises otherwise (cohere, gpt_neox: a mean-centring LayerNorm, global sign only)")


def gelu_gate(field: str) -> Requires:
    """Gemma's GeGLU: ``field`` names the activation of ``gate_proj`` (``hidden_act`` in Gemma, ``hidden_activation``
    in Gemma 2/3)."""
    return Requires(field, ("gelu_pytorch_tanh", "gelu", "gelu_new"),
                    "the MLP is gelu(gate_proj x) * up_proj x as derived and tested: unit signs ride on the linear "
                    "up/down pair only; another activation means another MLP")


# Task heads on the final residual (``*ForSequenceClassification`` ``score``, ``*ForTokenClassification``
# ``score``/``classifier``, ``*ForQuestionAnswering`` ``qa_outputs``): linears that read the residual.
HEAD_RULES: tuple[Rule, ...] = tuple(
    r for head in ("score", "classifier", "qa_outputs")
    for r in (Rule(f"{head}.weight", reads()), Rule(f"{head}.bias", UNTOUCHED))
)


def head_dim(config) -> dict[str, int]:
    """``dims`` of a decoder: ``head_dim`` from the config, else hidden_size / num_attention_heads."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"head_dim": hd}


def attention_rules(layer: str, qk_norm: tuple[Axis, ...] | None = None) -> tuple[Rule, ...]:
    """q/k/v (weights and biases), o_proj; ``qk_norm``: the axes of ``q_norm`` (k_norm gets the KV form), or None
    for norms in head space (one ``[head_dim]`` gain shared by every head: untouched)."""
    a = layer + "self_attn."
    q_norm = qk_norm if qk_norm is not None else UNTOUCHED
    k_norm = tuple(Axis(x.axis, x.space, x.signed, x.block, True) for x in q_norm)
    return (
        Rule(a + "q_proj.weight", reads(Q_ROWS)),
        Rule(a + "k_proj.weight", reads(KV_ROWS)),
        Rule(a + "v_proj.weight", reads(KV_ROWS)),
        Rule(a + "q_proj.bias", (Q_ROWS,)),
        Rule(a + "k_proj.bias", (KV_ROWS,)),
        Rule(a + "v_proj.bias", (KV_ROWS,)),
        Rule(a + "q_norm.weight", q_norm),
        Rule(a + "k_norm.weight", k_norm),
        Rule(a + "o_proj.weight", writes(O_COLS)),
        Rule(a + "o_proj.bias", writes()),
    )


def plain_mlp_rules(up: str, down: str) -> tuple[Rule, ...]:
    """``down(act(up x))`` without a gate, biases included: units permute, never signed (an elementwise ``act`` such
    as GELU, ReLU or ReLU² is not odd)."""
    rows, cols = Axis(0, "mlp.{i}", signed=False), Axis(1, "mlp.{i}", signed=False)
    return (Rule(up + ".weight", reads(rows)), Rule(up + ".bias", (rows,)),
            Rule(down + ".weight", writes(cols)), Rule(down + ".bias", writes()))


def gated_mlp_rules(layer: str) -> tuple[Rule, ...]:
    """``act(gate_proj x) * up_proj x`` then ``down_proj``: the act (SiLU, GELU-tanh) is not odd."""
    m = layer + "mlp."
    return (
        Rule(m + "gate_proj.weight", reads(MLP_GATE)),
        Rule(m + "up_proj.weight", reads(MLP)),
        Rule(m + "gate_proj.bias", (MLP_GATE,)),
        Rule(m + "up_proj.bias", (MLP,)),
        Rule(m + "down_proj.weight", writes(MLP_IN)),
        Rule(m + "down_proj.bias", writes()),
    )


def decoder_rules(prefix: str, norms: tuple[str, ...], qk_norm: tuple[Axis, ...] | None = None,
                  lm_head: str | None = "lm_head", heads: bool = True, gated: bool = True) -> tuple[Rule, ...]:
    """Every rule of a decoder whose body lives under ``prefix`` (``"model."``): embedding, layers with the
    residual norm gains ``norms`` (permuted only), final norm, the LM head named ``lm_head`` and (``heads``)
    the task heads; the MLP is gated (``gated_mlp_rules``) or not (``plain_mlp_rules``)."""
    layer = prefix + "layers.{i}."
    rules = (Rule(prefix + "embed_tokens.weight", reads()),)
    rules += attention_rules(layer, qk_norm) + (gated_mlp_rules(layer) if gated
                                                  else plain_mlp_rules(layer + "mlp.up_proj", layer + "mlp.down_proj"))
    rules += tuple(Rule(layer + n + ".weight", gain()) for n in norms)
    rules += (Rule(prefix + "norm.weight", gain()),)
    if lm_head:
        rules += (Rule(lm_head + ".weight", reads()), Rule(lm_head + ".bias", UNTOUCHED))
    return rules + (HEAD_RULES if heads else ())
