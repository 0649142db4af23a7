"""Vision-language-action (MindDrive-like): a language decision expert with LoRA and a trajectory action expert.

**Decision expert.** A causal language model from Hugging Face ``transformers``: by default a tiny Qwen2 (or
Llama) built locally from a config and randomly initialised with ``lm_seed`` (nothing downloaded); with
``lm_path`` a local directory holding a causal LM and its tokenizer (``save_pretrained`` layout) is loaded
instead. The shared :class:`~craft.policies.encoder.SceneEncoder` tokens are pooled into ``prefix_tokens`` (8)
tokens by learned queries plus the ego summary (one cross-attention, a small Q-former-style resampler that
keeps the LM sequence short), projected by a linear layer into the LM's embedding space and form a prefix; the
prompt text follows, e.g. ``"command left . decide speed and path :"`` with the navigation command
(:class:`~craft.world.observe.Command` names in lower case). The tokenizer of the tiny model is a word-level
``tokenizers`` tokenizer (``WordLevel`` + ``Whitespace``) over our own fixed vocabulary (special tokens, prompt
words, command words, decision words; :func:`vocabulary`), rebuilt deterministically from the config, so a
checkpoint is the single ``.pt`` file.

The decision expert scores **linguistic meta-actions**: ``G = len(speed_words) * len(path_words)`` (7 x 3 =
21) decisions, the text ``"<speed> <path>"`` after the prompt. Candidate ``g = i * len(path_words) + j``::

    logit(s_i, p_j) = log p(s_i | prefix) + log p(p_j | prefix, s_i)

where each softmax is **restricted to the decision words** (speed words for the first word, path words for
the second), so ``softmax(logits)`` over the 21 candidates is exactly the LM's joint distribution of the two
decision words given that only decision words may be said. One LM forward runs over the prefix (with
``use_cache``), its key/value cache is repeated ``len(speed_words)`` times along the batch and one more forward
of one token per speed word gives the path distributions.

**Decision meanings** (the labels for imitation follow them; ``L`` = the current lane's speed limit from the
observation, at least ``min_speed_limit``; the expert trajectory is ``(B, T, 3)`` in the ego frame, waypoints
every 0.5 s):

- speed word ``i`` = "reach ``speed_ratios[i] * L`` by the end of the horizon" (defaults: stop 0, crawl
  0.15 L, slow 0.35 L, medium 0.55 L, brisk 0.75 L, cruise 1.0 L, fast 1.15 L). Label: the ratio nearest to
  the expert's end speed ``|p_T - p_{T-1}| / 0.5 s`` divided by ``L``;
- path word ``j`` = "be ``path_offsets[j]`` m to the left of the route at the end of the horizon" (defaults:
  left +3.5 m, follow 0, right -3.5 m: one lane width). Label: the expert's last waypoint is projected onto
  the route polyline (``obs.route``, extended along its last segment); ``follow`` (the zero offset) if its
  signed lateral offset ``d`` has ``|d| <= path_threshold`` (1 m), otherwise the nearest offset of the same
  sign as ``d``.

**Action expert** (frozen in fine-tuning). Each decision is turned into a trajectory along the route: an
analytic prior plus a learned residual. Prior: distance travelled ``s(t)`` from the current speed towards
the decision's target speed at constant acceleration ``accel`` (``decel`` when slowing) then holding it;
lateral offset from the route ``d(s) = d0 + (offset - d0) * smoothstep(s / shift_length)`` (``d0``: the
ego's own offset from the route), i.e. a lane shift completed over ``shift_length`` m of travel. Residual:
an MLP over (ego scene feature, route points, speed, limit) plus learned speed- and path-decision embeddings
outputs per-waypoint corrections of ``s`` (x ``lon_scale`` m) and of ``d`` (x ``lat_scale`` m); its last
layer starts at zero (trajectories start as the prior). ``s`` is kept non-negative and non-decreasing;
waypoints are the route polyline's point at arc length ``s0 + s`` (``s0``: the ego's projection) shifted by
``d`` along its left normal; yaw is the direction of travel between waypoints (the route heading when not
moving). Trained by L1 regression of the labelled decision's trajectory to the expert's (teacher forcing).

**What trains when.** A ``peft`` LoRA adapter (rank ``lora_rank``, ``lora_alpha``, on ``lora_targets`` of
every attention layer) is attached at construction, its ``B`` matrices zero so it starts as the identity;
its parameters are created with ``requires_grad = False``. Imitation pre-training trains everything else
(encoder, projection, LM, action expert) and leaves the adapter at identity, so fine-tuning starts from a
fresh adapter on top of the pre-trained base. Fine-tuning (:meth:`VLAPolicy.trainable_parameters`) trains
the LoRA parameters only; every other weight stays bit-identical.

Checkpoints also store the token ids of the prompts and decision words as buffers; a checkpoint whose ids
differ from those the rebuilt tokenizer gives (e.g. a changed ``lm_path`` tokenizer) fails with a CraftError.
A checkpoint made with ``lm_path`` holds all the LM's weights but still needs that folder (its model config
and tokenizer) when it is loaded. Logits are bit-identical after a save / load round trip when the
parameters' ``requires_grad`` flags match (torch's ``matmul`` folds 3-d inputs differently when a weight
requires grad, which moves results by about one ulp).

Cost (one CPU thread, B = 256, defaults): the decision expert costs less than the shared scene encoder;
batched inference runs at about the speed of the vocab and hier families.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft  # an ImportError of these three makes the family unavailable (the package craft.policies skips it)
import tokenizers
import torch
import transformers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import Tensor, nn

from craft.errors import CraftError
from craft.policies.base import WAYPOINT_DT, CandidatePolicy, CandidateSet, register_family
from craft.policies.encoder import EncoderConfig, SceneEncoder
from craft.world.observe import Command, Observation

SPECIAL_TOKENS = ("[PAD]", "[UNK]")
"""Special tokens of the word-level tokenizer (ids 0 and 1)."""
_WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits into
COMMAND_WORDS = tuple(c.name.lower() for c in Command)
"""Prompt word of each navigation command, indexed by :class:`Command` value."""


@dataclass(frozen=True)
class VLAConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    horizon: int = 6
    """Waypoints per trajectory (0.5 s apart)."""
    # ---------------- language model
    lm_arch: str = "qwen2"
    """Architecture of the locally built LM: ``qwen2`` or ``llama`` (ignored with ``lm_path``)."""
    lm_hidden: int = 64
    """Hidden width of the locally built LM."""
    lm_layers: int = 2
    """Decoder layers of the locally built LM."""
    lm_heads: int = 4
    """Attention heads of the locally built LM."""
    lm_kv_heads: int = 2
    """Key/value heads (grouped-query attention) of the locally built LM."""
    lm_intermediate: int = 128
    """MLP width of the locally built LM."""
    lm_max_positions: int = 128
    """Longest sequence (scene tokens + prompt + 2 decision words) of the locally built LM."""
    prefix_tokens: int = 8
    """Scene prefix length: learned queries (plus the ego summary) pool the scene tokens into this many."""
    lm_seed: int = 0
    """Seed of the random initialisation of the locally built LM."""
    lm_path: str = ""
    """A local directory with a ``transformers`` causal LM and its tokenizer (empty: build the tiny LM)."""
    # ---------------- LoRA adapter on the decision expert
    lora_rank: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (0: deterministic)."""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Module names inside the LM's attention layers that get the adapter."""
    # ---------------- text
    prompt: str = "command {command} . decide speed and path :"
    """Prompt after the scene prefix; ``{command}`` becomes the navigation command's word."""
    speed_words: tuple[str, ...] = ("stop", "crawl", "slow", "medium", "brisk", "cruise", "fast")
    """The speed decisions (one word each)."""
    speed_ratios: tuple[float, ...] = (0.0, 0.15, 0.35, 0.55, 0.75, 1.0, 1.15)
    """Target end-of-horizon speed of each speed decision, as a fraction of the speed limit."""
    path_words: tuple[str, ...] = ("left", "follow", "right")
    """The path decisions (one word each)."""
    path_offsets: tuple[float, ...] = (3.5, 0.0, -3.5)
    """Lateral offset from the route (left positive) of each path decision at the end of the horizon, m."""
    path_threshold: float = 1.0
    """Expert end offsets within this of the route are labelled with the zero-offset path, m."""
    # ---------------- action expert
    min_speed_limit: float = 5.0
    """Speed limits below this (e.g. 0 off the lanes) count as this, m/s."""
    accel: float = 2.0
    """Acceleration of the prior speed profile, m/s^2."""
    decel: float = 4.0
    """Deceleration of the prior speed profile, m/s^2."""
    shift_length: float = 20.0
    """Travel over which the prior completes a lateral shift, m."""
    action_hidden: int = 64
    """Hidden width of the action expert's residual MLP."""
    lon_scale: float = 5.0
    """Scale of the along-route residual, m."""
    lat_scale: float = 1.0
    """Scale of the lateral residual, m."""
    traj_scale: float = 4.0
    """The trajectory regression error (mean L1 over waypoints, m) is divided by this."""

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig(**self.encoder))
        for name in ("lora_targets", "speed_words", "path_words"):
            object.__setattr__(self, name, tuple(str(w) for w in getattr(self, name)))
        for name in ("speed_ratios", "path_offsets"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.lm_arch not in ("qwen2", "llama"):
            raise CraftError(f"VLAConfig.lm_arch must be 'qwen2' or 'llama', got '{self.lm_arch}'")
        for name in ("horizon", "lm_hidden", "lm_layers", "lm_heads", "lm_kv_heads", "lm_intermediate",
                     "lm_max_positions", "lora_rank", "action_hidden", "prefix_tokens"):
            if getattr(self, name) < 1:
                raise CraftError(f"VLAConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lm_hidden % self.lm_heads or self.lm_heads % self.lm_kv_heads:
            raise CraftError(f"VLAConfig: lm_hidden {self.lm_hidden} must be divisible by lm_heads {self.lm_heads} "
                             f"and lm_heads by lm_kv_heads {self.lm_kv_heads}")
        for name in ("accel", "decel", "shift_length", "min_speed_limit", "lon_scale", "lat_scale", "traj_scale",
                     "lora_alpha"):
            if not getattr(self, name) > 0:
                raise CraftError(f"VLAConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0 or self.path_threshold < 0:
            raise CraftError(f"VLAConfig: lora_dropout in [0, 1) and path_threshold >= 0 needed, got "
                             f"{self.lora_dropout}, {self.path_threshold}")
        if "{command}" not in self.prompt:
            raise CraftError(f"VLAConfig.prompt must contain '{{command}}', got '{self.prompt}'")
        if len(self.speed_words) != len(self.speed_ratios) or len(self.speed_words) < 2:
            raise CraftError(f"VLAConfig: speed_words ({len(self.speed_words)}) and speed_ratios "
                             f"({len(self.speed_ratios)}) must have the same length >= 2")
        if len(self.path_words) != len(self.path_offsets) or len(self.path_words) < 1:
            raise CraftError(f"VLAConfig: path_words ({len(self.path_words)}) and path_offsets "
                             f"({len(self.path_offsets)}) must have the same length >= 1")
        if 0.0 not in self.path_offsets:
            raise CraftError(f"VLAConfig.path_offsets needs a 0.0 entry (follow the route), got {self.path_offsets}")
        if min(self.speed_ratios) < 0:
            raise CraftError(f"VLAConfig.speed_ratios must be >= 0, got {self.speed_ratios}")
        words = self.speed_words + self.path_words
        bad = [w for w in words if not re.fullmatch(r"[A-Za-z]+", w)]
        if bad:
            raise CraftError(f"VLAConfig: decision words must be single alphabetic words, got {bad}")
        if len(set(words)) != len(words):
            raise CraftError(f"VLAConfig: speed_words and path_words must be distinct words, got {words}")

    @property
    def num_candidates(self) -> int:
        return len(self.speed_words) * len(self.path_words)


# ---------------------------------------------------------------------- tokenizer
def vocabulary(cfg: VLAConfig) -> list[str]:
    """The word-level vocabulary, in id order: special tokens, prompt words, command words, decision words."""
    words = list(SPECIAL_TOKENS) + _WORD.findall(cfg.prompt.replace("{command}", " "))
    words += list(COMMAND_WORDS) + list(cfg.speed_words) + list(cfg.path_words)
    return list(dict.fromkeys(words))  # first occurrence wins: deterministic order


def build_tokenizer(cfg: VLAConfig) -> tokenizers.Tokenizer:
    """Word-level ``tokenizers`` tokenizer over :func:`vocabulary` (built offline, deterministic)."""
    vocab = {w: i for i, w in enumerate(vocabulary(cfg))}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok


class _Text:
    """Uniform ``encode(text) -> ids`` over our word-level tokenizer or the tokenizer of ``lm_path``.

    With ``lm_path`` its ``tokenizer.json`` is read with ``tokenizers`` as it is (``AutoTokenizer`` may rebuild
    a tokenizer from the model type instead); without one, ``transformers.AutoTokenizer`` loads the folder.
    """

    def __init__(self, cfg: VLAConfig):
        self.hf = None
        if cfg.lm_path:
            file = Path(cfg.lm_path) / "tokenizer.json"
            try:
                if file.is_file():
                    self.tok = tokenizers.Tokenizer.from_file(str(file))
                else:
                    self.hf = transformers.AutoTokenizer.from_pretrained(cfg.lm_path, local_files_only=True)
            except Exception as e:
                raise CraftError(f"VLAConfig.lm_path '{cfg.lm_path}': no usable tokenizer there "
                                 f"({type(e).__name__})") from None
            pad = self.hf.pad_token_id if self.hf is not None else None
            if self.hf is None:
                pad = next((self.tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|endoftext|>", "</s>")
                            if self.tok.token_to_id(t) is not None), None)
            self.pad_id = pad if pad is not None else 0  # padding is masked out: any id works
        else:
            self.tok = build_tokenizer(cfg)
            self.pad_id = self.tok.token_to_id("[PAD]")

    def __len__(self) -> int:
        return len(self.hf) if self.hf is not None else self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return list(self.hf(text, add_special_tokens=False)["input_ids"])
        return self.tok.encode(text, add_special_tokens=False).ids

    def word_id(self, word: str) -> int:
        """Id of a decision word said after other text (one token, or a CraftError)."""
        ids = self.encode(" " + word)
        if len(ids) != 1:
            raise CraftError(f"decision word '{word}' is {len(ids)} tokens for the tokenizer of this LM; "
                             f"choose words that are one token each")
        return ids[0]


# ---------------------------------------------------------------------- language model
def _base_lm(cfg: VLAConfig, vocab_size: int) -> nn.Module:
    """The causal LM without adapter: the seeded random tiny model, or the one at ``lm_path`` (float32)."""
    if cfg.lm_path:
        path = Path(cfg.lm_path)
        if not path.is_dir():
            raise CraftError(f"VLAConfig.lm_path '{cfg.lm_path}' is not a directory: give a local folder with a "
                             f"transformers causal LM (save_pretrained layout) or leave it empty")
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                                    attn_implementation="sdpa")
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise CraftError(f"VLAConfig.lm_path '{cfg.lm_path}': cannot load a causal LM from it "
                             f"({type(e).__name__}: {msg[:200]})") from None
        lm = lm.float()
    else:
        common = dict(vocab_size=vocab_size, hidden_size=cfg.lm_hidden, intermediate_size=cfg.lm_intermediate,
                      num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                      num_key_value_heads=cfg.lm_kv_heads, max_position_embeddings=cfg.lm_max_positions,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                      attention_dropout=0.0)
        conf = (transformers.Qwen2Config(use_sliding_window=False, **common) if cfg.lm_arch == "qwen2"
                else transformers.LlamaConfig(**common))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.lm_seed)
            lm = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa")
    return lm


def _build_lm(cfg: VLAConfig, vocab_size: int) -> nn.Module:
    """The causal LM of :func:`_base_lm` wrapped by ``peft`` with a LoRA adapter (identity at start)."""
    lm = _base_lm(cfg, vocab_size)
    lora = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.lora_targets), bias="none")
    try:
        with warnings.catch_warnings():  # peft queries a deprecated transformers attribute
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(lm, lora)
    except ValueError as e:
        raise CraftError(f"VLAConfig.lora_targets {cfg.lora_targets}: not found in the LM "
                         f"({str(e).splitlines()[0][:200]})") from None
    for name, p in model.named_parameters():  # pre-training: base trains, the adapter stays at identity
        p.requires_grad_("lora_" not in name)
    return model


# ---------------------------------------------------------------------- route geometry
def route_polyline(route: Tensor, mask: Tensor, spacing: float) -> tuple[Tensor, Tensor]:
    """The route ahead as a full polyline: masked points continue the last valid segment.

    route: (B, N, 2) ego frame, m; mask: (B, N) (valid points first). Without two valid points the route
    continues straight ahead along the ego's x axis from its one valid point (or the ego). Returns
    ``pts (B, N, 2)`` and ``cum (B, N)`` arc length at each point from the first.
    """
    B, N, _ = route.shape
    valid = mask.long().cumprod(1).bool()  # the valid prefix
    n = valid.sum(1)  # (B,)
    k = (n - 1).clamp_min(0)
    bidx = torch.arange(B, device=route.device)
    base = torch.where((n > 0)[:, None], route[bidx, k], torch.zeros_like(route[:, 0]))
    prev = route[bidx, (k - 1).clamp_min(0)]
    seg = base - prev
    seg_len = seg.norm(dim=-1, keepdim=True)
    ahead = torch.zeros_like(seg)
    ahead[:, 0] = 1.0
    direction = torch.where((n >= 2)[:, None] & (seg_len > 1e-3), seg / seg_len.clamp_min(1e-3), ahead)
    j = torch.arange(N, device=route.device)[None]
    ext = base[:, None] + direction[:, None] * ((j - k[:, None]).clamp_min(0) * spacing)[..., None]
    pts = torch.where(valid[..., None], route, ext)
    cum = torch.cat([torch.zeros_like(pts[:, :1, 0]), (pts[:, 1:] - pts[:, :-1]).norm(dim=-1).cumsum(1)], 1)
    return pts, cum


def polyline_at(pts: Tensor, cum: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Point and unit tangent of polylines ``pts (B, N, 2)`` (arc lengths ``cum (B, N)``) at ``s (B, K)``.

    Outside ``[0, cum[-1]]`` the first / last segment is extended. Returns ``xy (B, K, 2)``, ``tangent (B, K, 2)``.
    """
    N = pts.shape[1]
    i = (torch.searchsorted(cum.contiguous(), s.contiguous(), right=True) - 1).clamp(0, N - 2)
    seg = pts[:, 1:] - pts[:, :-1]
    seg_len = seg.norm(dim=-1)
    tang = seg / seg_len.clamp_min(1e-6)[..., None]
    tang = torch.where((seg_len > 1e-6)[..., None], tang, torch.tensor([1.0, 0.0], device=pts.device))
    g2 = i[..., None].expand(-1, -1, 2)
    p0 = pts.gather(1, g2)
    t = tang.gather(1, g2)
    along = s - cum.gather(1, i)
    return p0 + along[..., None] * t, t


def project_on_polyline(pts: Tensor, cum: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Arc length and signed lateral offset (left positive) of points ``q (B, K, 2)`` on ``pts (B, N, 2)``.

    The first and last segments extend to infinity (backwards / forwards). Returns ``s (B, K)``, ``d (B, K)``.
    """
    a, b = pts[:, :-1], pts[:, 1:]  # (B, S, 2)
    ab = b - a
    L2 = (ab * ab).sum(-1).clamp_min(1e-9)  # (B, S)
    aq = q[:, :, None] - a[:, None]  # (B, K, S, 2)
    u = (aq * ab[:, None]).sum(-1) / L2[:, None]
    S = ab.shape[1]
    lo = torch.zeros(S, device=q.device)
    hi = torch.ones(S, device=q.device)
    lo[0], hi[-1] = -1e9, 1e9
    u = torch.maximum(torch.minimum(u, hi), lo)
    proj = a[:, None] + u[..., None] * ab[:, None]
    diff = q[:, :, None] - proj
    i = (diff * diff).sum(-1).argmin(-1)  # (B, K) nearest segment
    take = lambda x: x.gather(2, i[..., None]).squeeze(2)  # noqa: E731  (B, K, S) -> (B, K)
    seg_len = L2.sqrt()
    Lk = take(seg_len[:, None].expand_as(u))
    s = take(cum[:, None, :-1].expand_as(u)) + take(u) * Lk
    abk = ab.gather(1, i[..., None].expand(-1, -1, 2))  # (B, K, 2)
    dk = diff.gather(2, i[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
    d = (abk[..., 0] * dk[..., 1] - abk[..., 1] * dk[..., 0]) / Lk
    return s, d


def speed_profile(v0: Tensor, target: Tensor, t: Tensor, accel: float, decel: float) -> Tensor:
    """Distance travelled at times ``t (T,)`` going from ``v0 (B,)`` to ``target (B, K)`` at constant
    acceleration ``accel`` (``decel`` when slowing), then holding the target speed -> ``(B, K, T)``."""
    v0 = v0[:, None, None]
    vt = target[..., None]
    dv = vt - v0
    a = torch.where(dv >= 0, torch.full_like(dv, accel), torch.full_like(dv, -decel))
    t_r = dv / a  # >= 0: time to reach the target
    tt = torch.minimum(t[None, None], t_r)
    return v0 * tt + 0.5 * a * tt * tt + vt * (t[None, None] - tt)


# ---------------------------------------------------------------------- policy
@register_family
class VLAPolicy(CandidatePolicy):
    """Language decision expert + action expert. forward: obs (B) -> CandidateSet (B, G=21, T, 3)."""

    family = "vla"
    Config = VLAConfig

    def __init__(self, cfg: VLAConfig):
        super().__init__(cfg)
        d = cfg.encoder.d_model
        oc = cfg.encoder.obs_config
        names = Observation.feature_names(oc)["ego"]
        self._i_speed, self._i_limit = names.index("speed"), names.index("speed_limit")
        self._pos_scale, self._speed_scale, self._spacing = oc.pos_scale, oc.speed_scale, oc.route_spacing
        self.encoder = SceneEncoder(cfg.encoder)
        text = _Text(cfg)
        vocab_size = len(text)
        self.lm = _build_lm(cfg, vocab_size)
        hidden = self._causal_lm().get_input_embeddings().weight.shape[1]
        # transformers >= 5.x renamed past_key_values to cache: use whichever this version's LM takes
        self._cache_kw = ("cache" if "cache" in inspect.signature(self._causal_lm().forward).parameters
                          else "past_key_values")
        self.prefix_q = nn.Parameter(torch.randn(cfg.prefix_tokens, d) * 0.5)
        self.prefix_pool = nn.MultiheadAttention(d, cfg.encoder.heads, batch_first=True)
        self.scene_proj = nn.Linear(d, hidden)
        # prompt of every command, left-padded to a common length (padding masked out), and decision word ids
        prompts = [text.encode(cfg.prompt.format(command=w)) for w in COMMAND_WORDS]
        Lp = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), Lp), text.pad_id, dtype=torch.long)
        pmask = torch.zeros(len(prompts), Lp, dtype=torch.bool)
        for c, p in enumerate(prompts):
            ids[c, Lp - len(p):] = torch.tensor(p, dtype=torch.long)
            pmask[c, Lp - len(p):] = True
        self.register_buffer("prompt_ids", ids)
        self.register_buffer("prompt_mask", pmask)
        self.register_buffer("speed_ids", torch.tensor([text.word_id(w) for w in cfg.speed_words]))
        self.register_buffer("path_ids", torch.tensor([text.word_id(w) for w in cfg.path_words]))
        self.register_buffer("speed_ratios", torch.tensor(cfg.speed_ratios), persistent=False)
        self.register_buffer("path_offsets", torch.tensor(cfg.path_offsets), persistent=False)
        # action expert: first layer split into a per-world context part and per-decision embeddings
        Nr = oc.route_points
        A = cfg.action_hidden
        self.act_ctx = nn.Linear(d + 3 * Nr + 2, A)
        self.act_speed = nn.Embedding(len(cfg.speed_words), A)
        self.act_path = nn.Embedding(len(cfg.path_words), A)
        self.act_out = nn.Sequential(nn.GELU(), nn.Linear(A, A), nn.GELU(), nn.Linear(A, 2 * cfg.horizon))
        nn.init.normal_(self.act_speed.weight, std=0.5)
        nn.init.normal_(self.act_path.weight, std=0.5)
        nn.init.zeros_(self.act_out[-1].weight)
        nn.init.zeros_(self.act_out[-1].bias)

    # ---------------------------------------------------------------- parts
    def _causal_lm(self) -> nn.Module:
        return self.lm.get_base_model()

    def scene_prefix(self, tokens: Tensor, mask: Tensor, ego: Tensor) -> Tensor:
        """(B, P, H) LM-space prefix: ``prefix_tokens`` queries (+ ego summary ``ego (B, D)``) attend to the scene
        ``tokens (B, S, D)`` (``mask (B, S)``), then a linear projection into the LM's embedding width."""
        q = self.prefix_q[None] + ego[:, None]
        pooled, _ = self.prefix_pool(q, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        return self.scene_proj(q + pooled)

    def decision_logits(self, obs: Observation, tokens: Tensor, mask: Tensor, ego: Tensor) -> Tensor:
        """(B, Ns * Np) log p(speed, path | scene, prompt) from the encoder's ``tokens (B, S, D)``,
        ``mask (B, S)``, ``ego (B, D)``."""
        lm = self._causal_lm()
        embed = lm.get_input_embeddings()
        B = tokens.shape[0]
        Ns, Np = self.speed_ids.numel(), self.path_ids.numel()
        cmd = obs.command.long().clamp(0, self.prompt_ids.shape[0] - 1)
        prefix = self.scene_prefix(tokens, mask, ego)
        x = torch.cat([prefix, embed(self.prompt_ids[cmd])], 1)  # (B, L, H)
        pm = self.prompt_mask[cmd]
        am = torch.cat([pm.new_ones(prefix.shape[:2]), pm], 1).long()  # (B, L)
        out = lm(inputs_embeds=x, attention_mask=am, use_cache=True, logits_to_keep=1)
        logp_s = torch.log_softmax(out.logits[:, -1, self.speed_ids], -1)  # (B, Ns)
        past = out.cache if self._cache_kw == "cache" else out.past_key_values
        past.batch_repeat_interleave(Ns)  # (B * Ns) rows: world-major, speed word minor
        xs = embed(self.speed_ids)[None].expand(B, -1, -1).reshape(B * Ns, 1, -1)
        am2 = torch.cat([am.repeat_interleave(Ns, 0), am.new_ones(B * Ns, 1)], 1)
        out2 = lm(inputs_embeds=xs, attention_mask=am2, use_cache=False, **{self._cache_kw: past}, logits_to_keep=1)
        logp_p = torch.log_softmax(out2.logits[:, -1, self.path_ids], -1).view(B, Ns, Np)
        return (logp_s[:, :, None] + logp_p).reshape(B, Ns * Np)

    def _route(self, obs: Observation) -> tuple[Tensor, Tensor]:
        return route_polyline(obs.route.float() * self._pos_scale, obs.route_mask, self._spacing)

    def _speeds(self, obs: Observation) -> tuple[Tensor, Tensor]:
        """Ego speed (B,) and effective speed limit (B,), m/s."""
        v0 = (obs.ego[:, self._i_speed].float() * self._speed_scale).clamp_min(0.0)
        limit = (obs.ego[:, self._i_limit].float() * self._speed_scale).clamp_min(self.cfg.min_speed_limit)
        return v0, limit

    def trajectories(self, obs: Observation, ego: Tensor) -> Tensor:
        """Action expert: (B, Ns, Np, T, 3) trajectory of every decision from the ego scene feature ``ego (B, D)``."""
        cfg = self.cfg
        B, T = ego.shape[0], cfg.horizon
        Ns, Np = len(cfg.speed_words), len(cfg.path_words)
        pts, cum = self._route(obs)
        s0, d0 = project_on_polyline(pts, cum, torch.zeros_like(pts[:, :1]))  # (B, 1)
        v0, limit = self._speeds(obs)
        t = torch.arange(1, T + 1, device=ego.device, dtype=ego.dtype) * WAYPOINT_DT
        prior_s = speed_profile(v0, self.speed_ratios[None] * limit[:, None], t, cfg.accel, cfg.decel)  # (B,Ns,T)
        ctx = torch.cat([ego, obs.route.float().flatten(1), obs.route_mask.float(),
                         (v0 / self._speed_scale)[:, None], (limit / self._speed_scale)[:, None]], 1)
        h = (self.act_ctx(ctx)[:, None, None] + self.act_speed.weight[None, :, None]
             + self.act_path.weight[None, None, :])  # (B, Ns, Np, A)
        res = self.act_out(h)  # (B, Ns, Np, 2T)
        s = prior_s[:, :, None] + cfg.lon_scale * res[..., :T]
        s = s.clamp_min(0.0).cummax(-1).values  # never backwards
        ramp = (s / cfg.shift_length).clamp(0.0, 1.0)
        ramp = ramp * ramp * (3 - 2 * ramp)
        off = self.path_offsets[None, None, :, None]
        dlat = d0[:, :, None, None] + (off - d0[:, :, None, None]) * ramp + cfg.lat_scale * res[..., T:]
        xy, tang = polyline_at(pts, cum, (s0[:, :, None, None] + s).reshape(B, -1))
        normal = torch.stack([-tang[..., 1], tang[..., 0]], -1)
        xy = (xy + dlat.reshape(B, -1, 1) * normal).view(B, Ns, Np, T, 2)
        step = torch.diff(xy, dim=-2, prepend=torch.zeros_like(xy[..., :1, :]))
        moving = step.norm(dim=-1, keepdim=True) > 0.1
        heading = torch.where(moving, step, tang.view(B, Ns, Np, T, 2))
        yaw = torch.atan2(heading[..., 1], heading[..., 0])
        return torch.cat([xy, yaw[..., None]], -1)

    # ---------------------------------------------------------------- labels
    def decision_labels(self, obs: Observation, expert: Tensor) -> tuple[Tensor, Tensor]:
        """Speed and path decision labels (B,), (B,) of expert trajectories ``expert (B, T, 3)`` (module docstring)."""
        _, limit = self._speeds(obs)
        pts, cum = self._route(obs)
        return (speed_label(expert, limit, self.speed_ratios),
                path_label(expert, pts, cum, self.path_offsets, self.cfg.path_threshold))

    # ---------------------------------------------------------------- interface
    def forward(self, obs: Observation) -> CandidateSet:
        tokens, mask, ego = self.encoder(obs)
        logits = self.decision_logits(obs, tokens, mask, ego)
        B = logits.shape[0]
        traj = self.trajectories(obs, ego).reshape(B, self.cfg.num_candidates, self.cfg.horizon, 3)
        valid = torch.ones_like(logits, dtype=torch.bool)
        return CandidateSet(traj, valid, logits)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parameters() if "lora_" in k}

    def imitation_loss(self, obs: Observation, expert: Tensor) -> dict[str, Tensor]:
        tokens, mask, ego = self.encoder(obs)
        logits = self.decision_logits(obs, tokens, mask, ego)
        B = logits.shape[0]
        traj = self.trajectories(obs, ego)  # (B, Ns, Np, T, 3)
        ls, lp = self.decision_labels(obs, expert)
        label = ls * len(self.cfg.path_words) + lp
        b = torch.arange(B, device=label.device)
        err = (traj[b, ls, lp, :, :2] - expert[..., :2]).abs().sum(-1).mean(-1)  # (B,) mean L1, m
        pred = logits.argmax(-1)
        Np = len(self.cfg.path_words)
        return {"loss_ce": nn.functional.cross_entropy(logits, label),
                "loss_traj": err.mean() / self.cfg.traj_scale,
                "acc": (pred == label).float().mean(),
                "acc_speed": (pred // Np == ls).float().mean(),
                "acc_path": (pred % Np == lp).float().mean(),
                "traj_l1": err.mean().detach()}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        for name in ("prompt_ids", "prompt_mask", "speed_ids", "path_ids"):
            if name in state_dict:
                mine, theirs = getattr(self, name), state_dict[name]
                if tuple(theirs.shape) != tuple(mine.shape) or not torch.equal(theirs.cpu(), mine.cpu()):
                    raise CraftError(f"vla checkpoint: its {name} differ from this tokenizer's (mismatched "
                                     f"vocabulary or lm_path tokenizer); use the tokenizer it was trained with")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def speed_label(expert: Tensor, limit: Tensor, ratios: Tensor) -> Tensor:
    """(B,) index of the speed ratio nearest the expert's end speed / ``limit (B,)`` (``expert (B, T, 3)``)."""
    xy = torch.cat([torch.zeros_like(expert[:, :1, :2]), expert[..., :2]], 1)
    v_end = (xy[:, -1] - xy[:, -2]).norm(dim=-1) / WAYPOINT_DT
    return ((v_end / limit)[:, None] - ratios[None]).abs().argmin(-1)


def path_label(expert: Tensor, pts: Tensor, cum: Tensor, offsets: Tensor, threshold: float) -> Tensor:
    """(B,) path decision of ``expert (B, T, 3)`` given the route polyline ``pts (B, N, 2)``, ``cum (B, N)``.

    The zero offset when the last waypoint is within ``threshold`` m of the route, else the nearest offset
    on the same side (the nearest overall if there is none on that side).
    """
    _, d = project_on_polyline(pts, cum, expert[:, -1:, :2])
    d = d[:, 0]
    o = offsets[None]
    near = (d.abs() <= threshold)[:, None]
    allowed = torch.where(near, o == 0, (torch.sign(o) == torch.sign(d)[:, None]) & (o != 0))
    allowed = allowed | ~allowed.any(1, keepdim=True)
    dist = (d[:, None] - o).abs().masked_fill(~allowed, float("inf"))
    return dist.argmin(-1)


def save_tiny_lm(cfg: VLAConfig, path: str | Path) -> None:
    """Write the locally built tiny LM (random weights, no adapter) and our tokenizer to ``path`` in the
    ``save_pretrained`` layout, usable as ``lm_path`` (a stand-in for a folder with real weights)."""
    if cfg.lm_path:
        raise CraftError("save_tiny_lm builds the tiny LM: give a config with an empty lm_path")
    path = Path(path)
    _base_lm(cfg, len(vocabulary(cfg))).save_pretrained(str(path))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(cfg), unk_token="[UNK]",
                                               pad_token="[PAD]")
    tok.save_pretrained(str(path))


__all__ = ["VLAConfig", "VLAPolicy", "vocabulary", "build_tokenizer", "route_polyline", "polyline_at",
           "project_on_polyline", "speed_profile", "speed_label", "path_label", "save_tiny_lm", "COMMAND_WORDS"]
