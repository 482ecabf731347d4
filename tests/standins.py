"""Stand-in masked-diffusion students, written here, each attending the way some real model code does:
what the patch's attention check (t3s_kernels/patching/attention.py) must accept, repair or refuse.

``behaviour``:
  * "honours": full attention; a 2-D mask is key padding, a 4-D additive mask is taken as given
    (transformers' own models with a non-causal config);
  * "causal_under_2d": a 2-D mask with padding is made causal, an all-ones one full, a 4-D one taken as
    given (LLaDA 2.0's released code under transformers 4.x, whose 2-D helper builds a causal mask);
  * "bool_4d": a 2-D mask is key padding, a 4-D mask is cast to bool and taken as True where a query may
    attend (Dream's released code: an additive mask comes out inverted);
  * "only_2d": a 2-D mask is key padding, and a 4-D one cannot be taken: it is reshaped to (B, -1) as a
    2-D one and the scores' addition raises (LLaDA 1's released code; LLaDA-MoE's raises too);
  * "ignores": full attention whatever mask it is given;
  * "causal": causal whatever mask it is given (an autoregressive model patched by mistake).

One attention layer and an MLP over learned position embeddings; the LM head is an ``nn.Linear``.

``LLaDALikeLM`` has LLaDA 1's head forms in the layout of its released code: an outer model whose
``model`` holds its own config and a ``transformer`` module dict (``wte``, ``ln_f``, and ``ff_out`` when
untied); with ``weight_tying`` the logits are ``F.linear(x, wte.weight)`` with no module call, and with
``scale_logits`` they are multiplied by 1 / sqrt(d_model) in place.
"""

import math

import torch
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

BEHAVIOURS = ("honours", "causal_under_2d", "bool_4d", "only_2d", "ignores", "causal")


class StandInConfig(PretrainedConfig):
    model_type = "t3s_standin"

    def __init__(self, vocab_size=97, hidden_size=16, max_positions=256, behaviour="honours", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.max_positions, self.behaviour = (vocab_size, hidden_size,
                                                                                 max_positions, behaviour)


class StandInLM(torch.nn.Module):
    def __init__(self, behaviour="honours", model_type=None, seed=0, vocab_size=97, hidden_size=16):
        super().__init__()
        assert behaviour in BEHAVIOURS
        torch.manual_seed(seed)
        self.config = StandInConfig(vocab_size=vocab_size, hidden_size=hidden_size, behaviour=behaviour)
        if model_type is not None:
            self.config.model_type = model_type
        h = hidden_size
        self.embed = torch.nn.Embedding(vocab_size, h)
        self.positions = torch.nn.Embedding(self.config.max_positions, h)
        self.qkv = torch.nn.Linear(h, 3 * h)
        self.out = torch.nn.Linear(h, h)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(h, 2 * h), torch.nn.GELU(), torch.nn.Linear(2 * h, h))
        self.norm = torch.nn.LayerNorm(h)
        self.lm_head = torch.nn.Linear(h, vocab_size, bias=False)

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def get_output_embeddings(self):
        return self.lm_head

    def _additive(self, attention_mask, t, device):
        behaviour = self.config.behaviour
        causal = torch.zeros(t, t, device=device).masked_fill(
            torch.ones(t, t, dtype=torch.bool, device=device).triu(1), torch.finfo(torch.float32).min)[None, None]
        if behaviour == "ignores":
            return None
        if behaviour == "causal":
            return causal
        if attention_mask is None:
            return None
        if attention_mask.dim() == 4 and behaviour == "bool_4d":
            return torch.zeros(attention_mask.shape, device=device).masked_fill(~attention_mask.bool(),
                                                                                torch.finfo(torch.float32).min)
        if attention_mask.dim() == 4 and behaviour == "only_2d":
            attention_mask = attention_mask.reshape(attention_mask.shape[0], -1)  # (B, L*L): the addition raises
            return torch.zeros(attention_mask.shape, device=device)[:, None, None, :]
        if attention_mask.dim() == 4:
            return attention_mask.float()
        padding = torch.zeros(attention_mask.shape, device=device).masked_fill(
            ~attention_mask.bool(), torch.finfo(torch.float32).min)[:, None, None, :]
        if behaviour == "causal_under_2d" and not bool(attention_mask.bool().all()):
            return (causal + padding).clamp(min=torch.finfo(torch.float32).min)
        return padding

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None,
                return_dict=None, **kwargs):
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)[None].expand(b, -1)
        x = self.embed(input_ids) + self.positions(position_ids)
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])
        mask = self._additive(attention_mask, t, x.device)
        if mask is not None:
            scores = scores + mask[:, 0]
        x = x + self.out(torch.softmax(scores, -1) @ v)
        x = self.norm(x + self.mlp(x))
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


class LLaDALikeConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, vocab_size=97, d_model=16, weight_tying=False, scale_logits=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.d_model, self.weight_tying, self.scale_logits = (vocab_size, d_model, weight_tying,
                                                                             scale_logits)


class _LLaDALikeInner(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(weight_tying=config.weight_tying, scale_logits=config.scale_logits,
                                      d_model=config.d_model)
        d, v = config.d_model, config.vocab_size
        self.transformer = torch.nn.ModuleDict(dict(wte=torch.nn.Embedding(v, d), wpe=torch.nn.Embedding(256, d),
                                                    qkv=torch.nn.Linear(d, 3 * d), ln_f=torch.nn.LayerNorm(d)))
        if not config.weight_tying:
            self.transformer.update({"ff_out": torch.nn.Linear(d, v, bias=False)})

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        t = input_ids.shape[1]
        position_ids = torch.arange(t, device=input_ids.device)[None] if position_ids is None else position_ids
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        q, k, v = self.transformer.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])
        if attention_mask is not None and attention_mask.dim() == 4:
            scores = scores + attention_mask[:, 0].float()
        elif attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], torch.finfo(torch.float32).min)
        x = self.transformer.ln_f(x + torch.softmax(scores, -1) @ v)
        if self.config.weight_tying:
            logits = torch.nn.functional.linear(x, self.transformer.wte.weight, None)
        else:
            logits = self.transformer.ff_out(x)
        if self.config.scale_logits:
            logits.mul_(1 / math.sqrt(self.config.d_model))
        return logits


class LLaDALikeLM(torch.nn.Module):
    def __init__(self, weight_tying=False, scale_logits=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = LLaDALikeConfig(weight_tying=weight_tying, scale_logits=scale_logits)
        self.model = _LLaDALikeInner(self.config)

    @property
    def dtype(self):
        return self.model.transformer.wte.weight.dtype

    def get_output_embeddings(self):
        return self.model.transformer.wte if self.config.weight_tying else self.model.transformer.ff_out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None,
                return_dict=None, **kwargs):
        return CausalLMOutput(logits=self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids))
