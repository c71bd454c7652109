"""ClickPrompt (Lin et al., WWW 2024): a CTR model generates soft prompts for a masked language model (PLM)
that reads the same row as text, so the ID view and the text view are aligned through the prompts.

Stages (one experiment, the one trainer):

1. ``warmup`` (``warmup=true``): plain masked-LM training of the PLM on the row texts, no prompts. The
   packaged MiniLM has no trained MLM head (its transform is newly initialised; the decoder is tied to the
   word embeddings), so the head learns the vocabulary first. A deviation from the paper forced by the
   packaged model; a user's bert-base or roberta-base with its head can skip it.
2. ``pretrain`` (``pretrain=true``): prompt-augmented MLM (PA-MLM). The backbone's representation (DESIGN
   contract 3) goes through a prompt generator, and the PLM predicts masked tokens of the row's text with
   those prompts in front: BERT masking (15%: 80% [MASK], 10% a random token, 10% unchanged), never on special
   tokens or prompts; cross-entropy on the masked tokens only, no CTR loss. Its gradient reaches the CTR
   model's embeddings through the prompts.
3. ``ctr``: fine-tuning from the PA-MLM weights, in one of two modes:
   - ``finetune=ctr`` (b): the CTR model alone: served without any PLM, exported by ``recsys.serve`` at the
     base model's cost;
   - ``finetune=joint`` (a): CTR model and PLM together: logit = CTR logit + PLM logit (the [CLS] state of the
     prompted PLM through ``Linear -> Tanh -> Linear``; ``learn_alpha`` weighs it), the PLM in its own
     parameter group (``plm_lr``). ``start_from=RUN`` starts it from a finished (b) run instead: that run's
     CTR model (its best) and its pre-trained PLM and prompt generator, the scoring head's last layer at zero so
     that the joint model starts at (b)'s scores; no warm-up or PA-MLM is rerun. A deviation for a CPU budget:
     joint fine-tuning from PA-MLM cannot cover the training split there, so the joint stage measures what the
     PLM adds to a trained CTR model. Its control is ``finetune=ctr`` with the same ``start_from``: the (b)
     run's CTR model trained on as many rows, with the same fresh optimizers, without the PLM.

Prompts (``prompt``): ``prefix`` (the paper's main variant): ``Linear(H -> d) -> Tanh -> Linear(d -> L x layers x
2 x d)``, reshaped into a key and a value prefix of length L for every layer (a ``DynamicCache``), the
attention mask extended over them; ``prompt``: L separate ``Linear(H -> d)`` heads give L vectors put in front
of the token embeddings.

The row texts are tokenised once (``python -m embedding_jobs.row_tokens``); the trainer reads them beside
each split (``Batch.extras``). transformers is imported only when the method is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import Batch
from recsys.data.schema import PreparedSchema
from recsys.methods.registry import MethodSpec, Upstream, register
from recsys.models.base import Backbone, CTROutput
from recsys.train.config import ConfigError
from recsys.train.evaluation import Evaluator, RatioEvaluator
from recsys.train.task import CTR_STAGE, ParamGroup, Stage, Task, TaskOutput

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig

WARMUP = Stage("warmup", monitor="mlm_loss", mode="min", kind="pretrain")
PRETRAIN = Stage("pretrain", monitor="mlm_loss", mode="min", kind="pretrain")
IGNORE = -100  # cross-entropy's ignored label


class PromptKind(StrEnum):
    PREFIX = "prefix"  # per-layer key/value prefixes
    PROMPT = "prompt"  # vectors in front of the token embeddings


class FineTune(StrEnum):
    CTR = "ctr"  # (b) the CTR model alone, served without the language model
    JOINT = "joint"  # (a) CTR model and language model together


@dataclass
class ClickPromptConfig:
    tokens: str = ""  # the row tokens (python -m embedding_jobs.row_tokens), made with the PLM's tokenizer
    plm: str = ""  # a local masked-LM folder; "": the packaged all-MiniLM-L6-v2 (no trained MLM head: warm it up)
    prompt: PromptKind = PromptKind.PREFIX
    prompt_length: int = 10
    finetune: FineTune = FineTune.CTR
    warmup: bool = True  # plain MLM on the row texts first (needed when the checkpoint lacks an MLM head)
    pretrain: bool = True  # PA-MLM; false: the CTR model is fine-tuned from scratch (the control)
    mask_prob: float = 0.15
    plm_lr: float = 5e-5  # the PLM's parameter group (AdamW); the CTR model and prompts use optim.dense_lr
    learn_alpha: bool = False  # joint: logit = CTR logit + alpha * PLM logit with a learned alpha
    start_from: str = ""  # a finished (b) run whose CTR model (joint: and PLM, prompts) starts the last stage

    def __post_init__(self) -> None:
        self.prompt, self.finetune = PromptKind(self.prompt), FineTune(self.finetune)


def bert_mask(ids: torch.Tensor, attention: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
              prob: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of ``ids`` [B, T]: each real, non-special token is chosen with probability ``prob``; a
    chosen token becomes ``mask_id`` (80%), a random token (10%) or stays (10%). Returns the masked ids and the
    labels (the original id where chosen, ``IGNORE`` elsewhere)."""
    device = ids.device
    chosen = (torch.rand(ids.shape, generator=generator, device=device) < prob) & attention & ~special
    roll = torch.rand(ids.shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=device)
    masked = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, torch.where(chosen, ids, torch.full_like(ids, IGNORE))


class PromptedMLM(nn.Module):
    """The PLM with a prompt generator and (joint mode) a scoring head: everything on the language side.

    One module, so that the train pipeline's fx trace treats it as a leaf and never traces transformers' code.
    """

    def __init__(self, mlm: nn.Module, rep_dim: int, cfg: ClickPromptConfig, special_ids: list[int], mask_id: int,
                 pad_id: int) -> None:
        super().__init__()
        c = mlm.config
        self.mlm, self.kind, self.length = mlm, PromptKind(cfg.prompt), cfg.prompt_length
        self.layers, self.heads, self.hidden = c.num_hidden_layers, c.num_attention_heads, c.hidden_size
        self.head_dim = self.hidden // self.heads
        self.mask_id, self.pad_id, self.vocab_size, self.mask_prob = mask_id, pad_id, c.vocab_size, cfg.mask_prob
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long), persistent=False)
        if self.kind is PromptKind.PREFIX:
            self.generator = nn.Sequential(nn.Linear(rep_dim, self.hidden), nn.Tanh(),
                                           nn.Linear(self.hidden, self.length * self.layers * 2 * self.hidden))
        else:
            self.generator = nn.ModuleList(nn.Linear(rep_dim, self.hidden) for _ in range(self.length))
        self.score_head = (nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
                           if cfg.finetune is FineTune.JOINT else None)
        if self.score_head is not None and cfg.start_from:
            nn.init.zeros_(self.score_head[-1].weight)  # the PLM adds nothing until it learns to
            nn.init.zeros_(self.score_head[-1].bias)
        self.eval_generator: torch.Generator | None = None

    def reset_eval_masks(self, seed: int = 0) -> None:
        """Evaluation masks the same tokens every pass (a fixed generator), so epochs compare."""
        self.eval_generator = torch.Generator().manual_seed(seed)

    def _encode(self, rep: torch.Tensor | None, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The PLM's last hidden states over the text's positions [B, T, hidden] (prompts in front, if any)."""
        from transformers.cache_utils import DynamicCache

        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)
        if rep is None:
            return self.mlm.base_model(input_ids=ids, attention_mask=attention.long(),
                                       position_ids=positions).last_hidden_state
        ones = torch.ones(b, self.length, dtype=torch.long, device=ids.device)
        mask = torch.cat([ones, attention.long()], dim=1)
        if self.kind is PromptKind.PREFIX:
            kv = self.generator(rep).view(b, self.layers, 2, self.heads, self.length, self.head_dim)
            cache = DynamicCache()
            for layer in range(self.layers):
                cache.update(kv[:, layer, 0], kv[:, layer, 1], layer)
            return self.mlm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                       past_key_values=cache, use_cache=False).last_hidden_state
        prompts = torch.stack([head(rep) for head in self.generator], dim=1)  # [B, L, hidden]
        words = self.mlm.get_input_embeddings()(ids)
        hidden = self.mlm.base_model(inputs_embeds=torch.cat([prompts, words], dim=1), attention_mask=mask,
                                     position_ids=torch.arange(self.length + t, device=ids.device).expand(b, -1)
                                     ).last_hidden_state
        return hidden[:, self.length:]

    @staticmethod
    def _trim(ids: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(1, int(length.max()))  # the batch's longest text, not the cache's padded width
        ids = ids[:, :t].long()
        return ids, torch.arange(t, device=ids.device).unsqueeze(0) < length.unsqueeze(1)

    def mlm_step(self, rep: torch.Tensor | None, ids: torch.Tensor, length: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked-LM loss summed over the masked tokens of real rows, their count, and how many were right."""
        ids, attention = self._trim(ids, length)
        attention = attention & (weights > 0).unsqueeze(1)  # padding rows mask nothing
        special = torch.isin(ids, self.special_ids)
        generator = None if self.training else self.eval_generator
        masked, labels = bert_mask(ids, attention, special, self.mask_id, self.vocab_size, self.mask_prob, generator)
        hidden = self._encode(rep, masked, attention)
        chosen = labels != IGNORE
        head = self.mlm.cls if hasattr(self.mlm, "cls") else self.mlm.lm_head
        logits = head(hidden[chosen])  # only the masked positions go through the vocabulary projection
        target = labels[chosen]
        loss_sum = F.cross_entropy(logits, target, reduction="sum")
        correct = (logits.argmax(-1) == target).sum()
        return loss_sum, chosen.sum(), correct

    def score(self, rep: torch.Tensor, ids: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Joint mode: the prompted PLM's logit for each row, from its [CLS] state."""
        ids, attention = self._trim(ids, length)
        return self.score_head(self._encode(rep, ids, attention)[:, 0]).squeeze(-1)

    EVAL_CHUNK = 256  # rows per PLM call outside training: an evaluation batch of 8,192 rows would not fit

    def forward(self, what: str, rep: torch.Tensor | None, ids: torch.Tensor, length: torch.Tensor,
                weights: torch.Tensor | None = None):
        """``what``: "mlm" (masked-LM sums, see :meth:`mlm_step`) or "score" (joint mode's logit). Called through
        ``forward`` so that the train pipeline's fx trace sees one leaf call, not transformers' code. Outside
        training the rows go through the PLM in chunks (the same results, bounded memory)."""
        if self.training or ids.shape[0] <= self.EVAL_CHUNK:
            return self.mlm_step(rep, ids, length, weights) if what == "mlm" else self.score(rep, ids, length)
        parts = []
        for start in range(0, ids.shape[0], self.EVAL_CHUNK):
            rows = slice(start, start + self.EVAL_CHUNK)
            r = None if rep is None else rep[rows]
            parts.append(self.mlm_step(r, ids[rows], length[rows], weights[rows]) if what == "mlm"
                         else self.score(r, ids[rows], length[rows]))
        if what == "mlm":
            return tuple(torch.stack(x).sum() for x in zip(*parts, strict=True))
        return torch.cat(parts)


class ClickPromptTask(Task):
    """A backbone, the prompted PLM, and the stages of ClickPrompt (see the module's docstring)."""

    def __init__(self, model: Backbone, plm: PromptedMLM, cfg: ClickPromptConfig, stages: tuple[Stage, ...]) -> None:
        super().__init__(model, stages)
        self.plm, self.cfg = plm, cfg
        self.tokens = Path(cfg.tokens)
        self.alpha = nn.Parameter(torch.ones(1)) if cfg.learn_alpha and cfg.finetune is FineTune.JOINT else None

    def side_files(self, split: str) -> tuple[str, ...]:
        return (str(self.tokens / f"{split}.parquet"),)

    def param_groups(self) -> list[ParamGroup]:
        # "prompts" (the prompt generator, the joint scoring head and alpha) learn with the dense defaults; a group
        # of their own lets a run freeze the CTR model (optim.groups={dense: {lr: 0}}) and train only them
        return [ParamGroup("plm", ("plm.mlm.",), optimizer="adamw", lr=self.cfg.plm_lr, weight_decay=0.01),
                ParamGroup("prompts", ("plm.generator.", "plm.score_head.", "alpha"))]

    def warm_start(self) -> dict[str, tuple[str, str]]:
        """``start_from``: the (b) run's best checkpoint holds its fine-tuned CTR model and, untouched by the CTR
        stage, its pre-trained PLM and prompt generator (which only the joint mode uses)."""
        if not self.cfg.start_from:
            return {}
        best = str(Path(self.cfg.start_from) / "checkpoints" / "best")
        parts = ("model.", "plm.mlm.", "plm.generator.") if self.cfg.finetune is FineTune.JOINT else ("model.",)
        return {part: (best, part) for part in parts}

    def output(self, batch: Batch) -> CTROutput:
        out = self.model(batch)
        if self.cfg.finetune is not FineTune.JOINT:
            return out
        plm_logit = self.plm("score", out.representation, batch.extras["input_ids"], batch.extras["length"])
        if self.alpha is not None:
            plm_logit = self.alpha * plm_logit
        return CTROutput(logit=out.logit + plm_logit, representation=out.representation,
                         field_embeddings=out.field_embeddings)

    def stage_forward(self, batch: Batch) -> TaskOutput:
        rep = self.model(batch).representation  # computed in warm-up too: every stage touches the same tables
        loss_sum, tokens, correct = self.plm("mlm", rep if self.stage is PRETRAIN else None,
                                             batch.extras["input_ids"], batch.extras["length"], batch.weights)
        loss = loss_sum / tokens.clamp(min=1)
        return loss, {"loss": loss.detach(), "weights": batch.weights, "loss_sum": loss_sum.detach(),
                      "tokens": tokens.detach().float(), "correct": correct.detach().float()}

    def evaluator(self, stage: Stage, split_file: Path | None = None) -> Evaluator:
        if stage.kind == "ctr":
            return super().evaluator(stage, split_file)
        self.plm.reset_eval_masks()
        return RatioEvaluator({"mlm_loss": ("loss_sum", "tokens"), "mlm_accuracy": ("correct", "tokens")})


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
TOKENS_HINT = "make them with `python -m embedding_jobs.row_tokens --dataset DATA --out DIR --model PLM`"


def _plm_folder(c: ClickPromptConfig) -> Path:
    if c.plm:
        return Path(c.plm)
    from embedding_jobs.model_files import packaged_minilm

    return packaged_minilm()


def _needs(cfg: ExperimentConfig) -> list[Upstream]:
    return [Upstream("method.clickprompt.tokens", cfg.method.clickprompt.tokens, "the row tokens", TOKENS_HINT,
                     required_files=("meta.json", "train.parquet", "valid.parquet", "test.parquet"))]


def _check(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    c = cfg.method.clickprompt
    if c.prompt_length < 1:
        raise ConfigError(f"method.clickprompt.prompt_length={c.prompt_length}: prompts need at least one position")
    if not 0 < c.mask_prob < 1:
        raise ConfigError(f"method.clickprompt.mask_prob={c.mask_prob}: must be between 0 and 1")
    if c.start_from:
        _check_start_from(cfg)
    if c.tokens and (Path(c.tokens) / "meta.json").is_file():
        meta = json.loads((Path(c.tokens) / "meta.json").read_text())
        if schema is not None and meta.get("dataset_fingerprint") != schema.fingerprint:
            raise ConfigError(f"{c.tokens}: row tokens of dataset {meta.get('dataset_name')!r} (fingerprint "
                              f"{meta.get('dataset_fingerprint')}), not of {schema.name!r} ({schema.fingerprint})")
        from embedding_jobs.row_tokens import tokenizer_hash

        folder = _plm_folder(c)
        if meta.get("tokenizer_hash") != tokenizer_hash(folder):
            raise ConfigError(f"{c.tokens}: row tokens made with the tokenizer of {meta.get('tokenizer')}, not of "
                              f"the PLM {folder}; {TOKENS_HINT}")


def _check_start_from(cfg: ExperimentConfig) -> None:
    c, run = cfg.method.clickprompt, Path(cfg.method.clickprompt.start_from)
    if not (run / "test_metrics.json").is_file() or not (run / "config.yaml").is_file():
        raise ConfigError(f"method.clickprompt.start_from={run}: not a finished run (no test_metrics.json)")
    from recsys.experiment import load_config

    theirs = load_config(run / "config.yaml")
    t = theirs.method.clickprompt
    same = {"method.name": (cfg.method.name, theirs.method.name), "plm": (c.plm, t.plm),
            "model.backbone": (cfg.model.backbone, theirs.model.backbone),
            "data.path": (cfg.data.path, theirs.data.path), "prompt": (c.prompt, t.prompt),
            "prompt_length": (c.prompt_length, t.prompt_length)}
    differ = [k for k, (mine, other) in same.items() if mine != other]
    differ += [k for k, is_b in (("finetune", t.finetune is FineTune.CTR), ("pretrain", t.pretrain)) if not is_b]
    if differ:
        raise ConfigError(f"method.clickprompt.start_from={run}: not a mode (b) run of this model (it differs in "
                          f"{', '.join(differ)})")


def _build(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    c = cfg.method.clickprompt
    folder = _plm_folder(c)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"{folder}: the tokenizer has no mask token; ClickPrompt needs a masked language model")
    mlm, info = AutoModelForMaskedLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     output_loading_info=True, dtype=torch.float32)
    untrained = [k for k in info["missing_keys"] if not k.endswith("decoder.weight")]
    if untrained and not c.warmup and not c.start_from:  # start_from loads a run's trained head
        raise ConfigError(f"{folder} has no trained MLM head (missing {untrained[:2]}...): set "
                          "method.clickprompt.warmup=true, or give a checkpoint with its head")
    backbone = cfg.model.build(schema, device)
    special = [i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                           tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    plm = PromptedMLM(mlm, backbone.representation_dim, c, special, tokenizer.mask_token_id, tokenizer.pad_token_id)
    fresh = not c.start_from  # a (b) run's warm-up and PA-MLM are loaded, not rerun
    stages = tuple(s for s, on in ((WARMUP, c.warmup), (PRETRAIN, c.pretrain)) if on and fresh) + (CTR_STAGE,)
    return ClickPromptTask(backbone, plm, c, stages)


SPEC = register(MethodSpec(
    name="clickprompt", summary="CTR models prompt a masked LM: PA-MLM pre-training, then fine-tuning (ClickPrompt)",
    build=_build, section="clickprompt", config=ClickPromptConfig, check=_check, needs=_needs,
    exports=lambda cfg: cfg.method.clickprompt.finetune is FineTune.CTR))
