"""LD3M (Moser et al., TMLR): learn latent codes Z (initialised from VAE encodings of real images) and conditioning
codes c (initialised from the class embedding) through the whole T-step reverse process of eq. 12, with a DM, DC or
MTT loss on the decoded images (MTT reads an expert buffer from `ddcodec experts train`). The bundle stores Z and c
(fp16, optimised through that rounding), T, the scheduler and the seeds; `ddcodec.generators.ld3m` regenerates exactly
the images that were optimised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from ..bundle import Bundle, derive_seed, new_manifest, write_bundle
from ..bundle.fingerprint import reference_ids
from ..data import load_source, readable_names
from ..errors import DDCodecError
from ..eval.augment import normalize
from ..eval.students import ConvNet, convnet_depth
from ..generators.ld3m import LD3MPipeline, round_to
from ..generators.pipelines import build_pipeline
from ..generators.prior import LatentPrior, load_prior
from ..labels import softlabels
from ..parallel import init_from_env, is_main
from .checkpoint import WorkDir
from .common import (check_class_sizes, class_indices, default_prompts, encode_latents, generator_record, image_size,
                     load_images, option, pick_random, seeded_subset, work_params)
from .experts import ExpertBuffer, param_layout, unflatten
from .matching import (DSA_STRATEGY, Augmentation, dc_class_loss, dc_loops, dm_class_loss, parse_strategy,
                       train_network)

LOSSES = ("dm", "dc", "mtt")
CODE_DTYPE = torch.float16  # stored precision of Z and c; the optimisation sees exactly these values
DEFAULTS: dict[str, Any] = {
    "ld3m_loss": "dm",
    "lr": {"dm": 1e-2, "dc": 1e-3, "mtt": 10.0},  # paper A.3, for Z and c alike
    "optimizer": "sgd", "momentum": 0.5,      # paper Table 8 (GLaD's SGD with momentum 0.5)
    "batch_real": 256,                        # paper Table 8
    "eta": 1.0,                               # eq. 12 draws sigma_t * eps_t at every step
    "guidance_scale": 3.0,                    # paper A.3
    "dsa_strategy": DSA_STRATEGY,             # paper Table 8
    "checkpoint_every": 50,
    "variants": 1,                            # one seeded noise draw: the consumer sees exactly the optimised set
    "lr_net": 0.01, "batch_train": 256,       # DC inner loop (DC defaults)
    # MTT (Cazenavette et al. 2022): expert epochs M and max start epoch as MTT's CIFAR-10 IPC 10 run, N = 20 synthetic
    # steps as LD3M A.3 (and MTT's default), learnable synthetic lr initialised at 0.01 and updated by SGD (lr 1e-5,
    # momentum 0.5), as MTT
    "expert_epochs": 2, "max_start_epoch": 20, "syn_steps": 20, "syn_lr": 0.01, "lr_lr": 1e-5, "lr_momentum": 0.5,
}


def default_steps(size: tuple[int, int]) -> int:
    """T = 10 up to 128 px, 20 above (paper Sec. 4.1)."""
    return 10 if max(size) <= 128 else 20


def default_iterations(size: tuple[int, int]) -> int:
    """5,000 iterations up to 128 px, 10,000 above (paper Table 8)."""
    return 5000 if max(size) <= 128 else 10000


def add_arguments(group: Any) -> None:
    """LD3M options (default None: the method's defaults apply)."""
    group.add_argument("--ld3m-loss", choices=LOSSES, default=None,
                       help="ld3m: distillation loss, distribution (dm, default), gradient (dc) or trajectory matching (mtt)")
    group.add_argument("--iterations", type=int, default=None, help="ld3m: optimisation steps (default 5000; 10000 above 128 px)")
    group.add_argument("--lr-z", type=float, default=None, help="ld3m: learning rate of the latent codes Z (dm 1e-2, dc 1e-3, mtt 10)")
    group.add_argument("--lr-c", type=float, default=None, help="ld3m: learning rate of the conditioning codes c (dm 1e-2, dc 1e-3, mtt 10)")
    group.add_argument("--ld3m-optimizer", choices=("sgd", "adam"), default=None,
                       help="ld3m: sgd with momentum 0.5 (default, as the paper) or adam")
    group.add_argument("--steps", type=int, default=None,
                       help="scheduler steps (d4m 25, dace 5, ld3m T: 10 up to 128 px, 20 above)")
    group.add_argument("--guidance-scale", type=float, default=None,
                       help="classifier-free guidance (d4m: 8 for text priors, 4 for class priors; dace 1; ld3m 3)")
    group.add_argument("--eta", type=float, default=None, help="ld3m: DDIM eta, the share of sigma_t noise drawn (default 1)")
    group.add_argument("--batch-real", type=int, default=None, help="ld3m: real images per class per iteration (default 256)")
    group.add_argument("--dsa-strategy", default=None, help=f"ld3m: DSA augmentations, or none (default {DSA_STRATEGY})")
    group.add_argument("--checkpoint-every", type=int, default=None, help="ld3m: save resumable state every N iterations (default 50)")
    group.add_argument("--candidates", type=int, default=None,
                       help="real images per class considered (d4m, ld3m: all; dace/rded: 300)")
    group.add_argument("--expert-dir", default=None, help="ld3m mtt: expert buffer from `ddcodec experts train` (required)")
    group.add_argument("--expert-epochs", type=int, default=None, help="ld3m mtt: target is M expert epochs after the start (default 2)")
    group.add_argument("--max-start-epoch", type=int, default=None,
                       help="ld3m mtt: start epochs are drawn below this, and at most E - M (default 20)")
    group.add_argument("--syn-steps", type=int, default=None, help="ld3m mtt: student SGD steps N on the synthetic images (default 20)")
    group.add_argument("--batch-syn", type=int, default=None, help="ld3m mtt: synthetic images per student step (default all)")
    group.add_argument("--syn-lr", type=float, default=None, help="ld3m mtt: initial learnable student learning rate (default 0.01)")
    group.add_argument("--lr-lr", type=float, default=None, help="ld3m mtt: learning rate of the student learning rate (default 1e-5)")
    softlabels.add_arguments(group)


@dataclass(frozen=True)
class Config:
    """Everything that determines the optimisation."""

    loss: str
    iterations: int
    lr_z: float
    lr_c: float
    optimizer: str
    momentum: float
    batch_real: int
    dsa: str
    checkpoint_every: int
    variants: int
    outer_loop: int = 1
    inner_loop: int = 0
    lr_net: float = DEFAULTS["lr_net"]
    batch_train: int = DEFAULTS["batch_train"]
    expert_epochs: int = DEFAULTS["expert_epochs"]
    max_start_epoch: int = DEFAULTS["max_start_epoch"]
    syn_steps: int = DEFAULTS["syn_steps"]
    batch_syn: int | None = None  # None: all synthetic images in every student step
    syn_lr: float = DEFAULTS["syn_lr"]
    lr_lr: float = DEFAULTS["lr_lr"]

    def record(self) -> dict[str, Any]:
        rec = {"loss": self.loss, "iterations": self.iterations, "lr_z": self.lr_z, "lr_c": self.lr_c,
               "optimizer": self.optimizer, "momentum": self.momentum if self.optimizer == "sgd" else None,
               "batch_real": self.batch_real if self.loss != "mtt" else None, "dsa": self.dsa, "joint_classes": True}
        if self.loss == "dc":
            rec.update(outer_loop=self.outer_loop, inner_loop=self.inner_loop, lr_net=self.lr_net, batch_train=self.batch_train)
        if self.loss == "mtt":
            rec.update(expert_epochs=self.expert_epochs, max_start_epoch=self.max_start_epoch, syn_steps=self.syn_steps,
                       batch_syn=self.batch_syn, syn_lr=self.syn_lr, lr_lr=self.lr_lr, lr_momentum=DEFAULTS["lr_momentum"])
        return rec


def seeded_convnet(seed: int, num_classes: int, size: tuple[int, int], device: torch.device) -> ConvNet:
    """A ConvNet-D (width 128, instance norm, avg-pool) with seeded initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ConvNet(3, num_classes, 128, convnet_depth(min(size)), im_size=size)
    return net.to(device)


class Distiller:
    """Holds Z and c (fp32 masters, seen through fp16 rounding), the optimiser and the matching network (MTT: the
    expert buffer and the learnable student learning rate)."""

    def __init__(self, pipe: LD3MPipeline, z0: torch.Tensor, c0: torch.Tensor, real: list[torch.Tensor],
                 cfg: Config, seed: int, experts: ExpertBuffer | None = None, num_classes: int | None = None) -> None:
        self.pipe, self.cfg, self.seed = pipe, cfg, seed
        self.device = pipe.device
        self.z = z0.detach().float().clone().to(self.device).requires_grad_(True)
        self.c = c0.detach().float().clone().to(self.device).requires_grad_(True)
        self.class_ids = pipe.items["class_ids"].to(self.device)
        self.ids = list(range(len(self.z)))
        self.num_classes = len(real) if num_classes is None else num_classes
        self.members = [torch.nonzero(self.class_ids == k).flatten() for k in range(self.num_classes)]
        # DM is a sum of independent per-class terms against a frozen network, so torchrun ranks split the
        # classes (class k on rank k mod world) and get the same codes as one process. DC trains one network
        # on all classes between steps; every rank then runs the whole optimisation.
        self.rank, self.world = init_from_env() if cfg.loss == "dm" else (0, 1)
        self.classes = list(range(self.rank, self.num_classes, self.world))
        self.mine = [i for i in self.ids if int(self.class_ids[i]) % self.world == self.rank]
        where = {i: p for p, i in enumerate(self.mine)}
        self.local = {k: torch.tensor([where[int(i)] for i in self.members[k]], dtype=torch.long) for k in self.classes}
        self.real = real
        self.ops = parse_strategy(cfg.dsa)
        groups = [{"params": [self.z], "lr": cfg.lr_z}, {"params": [self.c], "lr": cfg.lr_c}]
        self.opt = (torch.optim.SGD(groups, lr=cfg.lr_z, momentum=cfg.momentum) if cfg.optimizer == "sgd"
                    else torch.optim.Adam(groups, lr=cfg.lr_z))
        self.net: ConvNet | None = None
        self.experts = experts
        self.syn_lr: torch.Tensor | None = None
        self.opt_lr: torch.optim.Optimizer | None = None
        if cfg.loss == "mtt":
            if experts is None:
                raise DDCodecError("--ld3m-loss mtt needs --expert-dir", "train a buffer with ddcodec experts train")
            # the student is the matching ConvNet run functionally on flat expert parameters
            self.template = seeded_convnet(0, self.num_classes, pipe.image_size, self.device).requires_grad_(False)
            self.layout = param_layout(self.template)
            self.start_limit = mtt_start_limit(cfg, experts.epochs)
            self.syn_lr = torch.tensor(cfg.syn_lr, dtype=torch.float32, device=self.device).requires_grad_(True)
            self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=DEFAULTS["lr_momentum"])
        self.iteration = 0
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.probe_start: float | None = None

    # the generator, through the stored precision ------------------------------------------------
    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, c) exactly as they will be stored, differentiable (straight-through rounding)."""
        return round_to(self.z, CODE_DTYPE), round_to(self.c, CODE_DTYPE)

    def render(self, variant: int, ids: list[int] | None = None, grad: bool = True) -> torch.Tensor:
        """Images of items `ids` (this rank's by default) at `variant`, by the optimisation's own path."""
        ids = self.mine if ids is None else ids
        z, c = self.codes()
        rows = torch.tensor(ids, device=self.device)
        return self.pipe.forward_batched(z[rows], c[rows], ids, variant, grad=grad)

    # the objective ------------------------------------------------------------------------------
    def network(self, it: int, fresh: bool = False) -> ConvNet:
        """DM: a new random ConvNet every iteration. DC: re-initialised every outer_loop iterations. MTT: the
        functional template (its weights come from the experts)."""
        size = self.pipe.image_size
        if self.cfg.loss == "mtt":
            return self.template
        if self.cfg.loss == "dm":
            return seeded_convnet(derive_seed(self.seed, it, 0, "ld3m-net"), self.num_classes, size, self.device).requires_grad_(False)
        if fresh:
            return seeded_convnet(derive_seed(self.seed, it, 0, "ld3m-net"), self.num_classes, size, self.device)
        if self.net is None or it % self.cfg.outer_loop == 0:
            start = it - it % self.cfg.outer_loop
            self.net = seeded_convnet(derive_seed(self.seed, start, 0, "ld3m-net"), self.num_classes, size, self.device)
        return self.net

    def objective(self, net: ConvNet, images: torch.Tensor, it: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(sum, per-class terms) of the DM or DC loss of this rank's classes against seeded real batches, with a
        shared DSA draw per class; `images` are this rank's items. MTT: one term over all classes."""
        if self.cfg.loss == "mtt":
            loss = self.trajectory_loss(images, it)
            return loss, {0: loss}
        loss = images.new_zeros(())
        terms = {}
        for k in self.classes:
            g = torch.Generator().manual_seed(derive_seed(self.seed, it, k, "ld3m-batch"))
            pool = self.real[k]
            real = pool[torch.randperm(len(pool), generator=g)[:self.cfg.batch_real]].to(self.device).float() / 255
            aug = Augmentation.sample(self.ops, g, self.pipe.image_size)
            r, s = aug(normalize(real)), aug(normalize(images[self.local[k].to(images.device)]))
            terms[k] = dm_class_loss(net, r, s) if self.cfg.loss == "dm" else dc_class_loss(net, r, s, k)
            loss = loss + terms[k]
        return loss, terms

    def trajectory_loss(self, images: torch.Tensor, it: int) -> torch.Tensor:
        """MTT (eq. 4): from expert k's parameters after epoch t, N SGD steps of the ConvNet on minibatches of the
        synthetic images (hard labels, DSA, the learnable lr), keeping the graph; the squared distance to the expert's
        parameters after epoch t + M, over the expert's own squared distance. Expert, start and batches are seeded by
        the iteration."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(derive_seed(self.seed, it, 0, "ld3m-mtt"))
        k = int(torch.randint(len(self.experts), (1,), generator=g))
        t = int(torch.randint(self.start_limit, (1,), generator=g))
        start, target = (p.to(self.device) for p in self.experts.pair(k, t, cfg.expert_epochs))
        x, y = normalize(images), self.class_ids
        batch = len(x) if cfg.batch_syn is None else cfg.batch_syn
        w = start.clone().requires_grad_(True)
        chunks: list[torch.Tensor] = []
        for _ in range(cfg.syn_steps):
            if not chunks:  # as MTT: a fresh permutation split into batch_syn chunks, taken from the end
                chunks = list(torch.randperm(len(x), generator=g).split(batch))
            idx = chunks.pop().to(self.device)
            aug = Augmentation.sample(self.ops, g, self.pipe.image_size)
            out = functional_call(self.template, unflatten(w, self.layout), (aug(x[idx]),))
            grad = torch.autograd.grad(F.cross_entropy(out, y[idx]), w, create_graph=True)[0]
            w = w - self.syn_lr * grad
        return ((w - target) ** 2).sum() / ((start - target) ** 2).sum()

    def total(self, terms: dict[int, torch.Tensor]) -> float:
        """The loss over all classes, summed in class order (the same figure on any number of ranks)."""
        per_class = torch.zeros(self.num_classes, dtype=torch.float64)
        for k, v in terms.items():
            per_class[k] = float(v.detach())
        if self.world > 1:
            torch.distributed.all_reduce(per_class)  # each class is non-zero on exactly one rank: exact
        return sum(per_class.tolist())

    def gather(self) -> None:
        """Every rank gets every class's codes from the rank that optimised them."""
        if self.world == 1:
            return
        for p in (self.z, self.c):
            parts = [torch.empty_like(p.data) for _ in range(self.world)]
            torch.distributed.all_gather(parts, p.data.contiguous())
            with torch.no_grad():
                for k in range(self.num_classes):
                    rows = self.members[k]
                    p[rows] = parts[k % self.world][rows]

    def step(self) -> float:
        """One optimisation step on Z and c (all classes jointly, as the paper); returns the loss."""
        it, t0 = self.iteration, time.perf_counter()
        net = self.network(it)
        images = self.render(it % self.cfg.variants)  # the generator runs oneDNN-free (bitwise); the ConvNet need not
        loss, terms = self.objective(net, images, it)
        self.opt.zero_grad(set_to_none=True)
        if self.opt_lr is not None:
            self.opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.opt_lr is not None:
            self.opt_lr.step()
        if self.cfg.loss == "dc" and (it + 1) % self.cfg.outer_loop and self.cfg.inner_loop:
            g = torch.Generator().manual_seed(derive_seed(self.seed, it, 0, "ld3m-inner"))
            train_network(net, normalize(images.detach()), self.class_ids, self.cfg.inner_loop, self.cfg.lr_net,
                          self.cfg.batch_train, self.ops, g)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.iteration += 1
        self.losses.append(self.total(terms))
        self.seconds.append(time.perf_counter() - t0)
        return self.losses[-1]

    def probe(self) -> float:
        """The loss of the current codes under iteration 0's fresh network, batches and augmentation (a fixed yardstick)."""
        with torch.no_grad():  # grad=False skips checkpointing, so in grad mode autograd would keep all T calls' activations
            images = self.render(0, grad=False)
        with torch.enable_grad():
            return self.total(self.objective(self.network(0, fresh=True), images, 0)[1])

    # resumable state ----------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue exactly: codes, optimisers, DC network, MTT learning rate, history."""
        out = {"z": self.z, "c": self.c, "iteration": torch.tensor([self.iteration]),
               "losses": torch.tensor(self.losses, dtype=torch.float64),
               "seconds": torch.tensor(self.seconds, dtype=torch.float64),
               "probe_start": torch.tensor([self.probe_start if self.probe_start is not None else float("nan")])}
        for prefix, opt, params in self.optimizers():
            for i, p in enumerate(params):
                for key, v in opt.state.get(p, {}).items():
                    if v is not None:
                        out[f"{prefix}.{i}.{key}"] = v if torch.is_tensor(v) else torch.tensor(v)
        if self.syn_lr is not None:
            out["syn_lr"] = self.syn_lr
        if self.net is not None:
            out.update({f"net.{k}": v for k, v in self.net.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def optimizers(self) -> list[tuple[str, torch.optim.Optimizer, tuple[torch.Tensor, ...]]]:
        """(state-key prefix, optimiser, its parameters): the codes' and, for MTT, the learning rate's."""
        out = [("opt", self.opt, (self.z, self.c))]
        if self.opt_lr is not None:
            out.append(("opt_lr", self.opt_lr, (self.syn_lr,)))
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from state()."""
        with torch.no_grad():
            self.z.copy_(state["z"])
            self.c.copy_(state["c"])
        self.iteration = int(state["iteration"][0])
        self.losses, self.seconds = state["losses"].tolist(), state["seconds"].tolist()
        probe = float(state["probe_start"][0])
        self.probe_start = None if probe != probe else probe
        if self.syn_lr is not None:
            with torch.no_grad():
                self.syn_lr.copy_(state["syn_lr"])
        for prefix, opt, params in self.optimizers():
            for key, v in state.items():
                if key.startswith(prefix + "."):
                    _, i, name = key.split(".", 2)
                    opt.state[params[int(i)]][name] = v if name == "step" else v.to(self.device)
        net = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        self.net = None
        if net and self.cfg.loss == "dc" and self.iteration % self.cfg.outer_loop:
            self.net = seeded_convnet(0, self.num_classes, self.pipe.image_size, self.device)
            self.net.load_state_dict(net)

    def run(self, work: WorkDir, label: str = "ld3m") -> None:
        """Optimise to cfg.iterations, saving state every checkpoint_every iterations; resumes from `work`."""
        key = "ld3m-state" if self.world == 1 else f"ld3m-state-r{self.rank}of{self.world}"
        saved = work.get(key)
        if saved is not None:
            self.load_state(saved)
        if self.probe_start is None:
            self.probe_start = self.probe()
        every = max(1, self.cfg.checkpoint_every)
        with tqdm(total=self.cfg.iterations, initial=self.iteration, desc=label, unit="it", disable=self.rank != 0) as bar:
            while self.iteration < self.cfg.iterations:
                loss = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", step_s=f"{self.seconds[-1]:.2f}")
                if self.iteration % every == 0 or self.iteration == self.cfg.iterations:
                    work.put(key, self.state())
        self.gather()


def config_from_args(args: Any, ipc: int, size: tuple[int, int], variants: int) -> Config:
    """The optimisation settings from parsed args and the paper's defaults; one-line errors."""
    loss = option(args, "ld3m_loss", DEFAULTS["ld3m_loss"])
    if loss not in LOSSES:
        raise DDCodecError(f"unknown --ld3m-loss {loss!r}", "use dm, dc or mtt")
    lr = DEFAULTS["lr"][loss]
    outer, inner = dc_loops(ipc) if loss == "dc" else (1, 0)
    batch_syn = option(args, "batch_syn", None)
    cfg = Config(loss=loss, iterations=int(option(args, "iterations", default_iterations(size))),
                 lr_z=float(option(args, "lr_z", lr)), lr_c=float(option(args, "lr_c", lr)),
                 optimizer=option(args, "ld3m_optimizer", DEFAULTS["optimizer"]), momentum=DEFAULTS["momentum"],
                 batch_real=int(option(args, "batch_real", DEFAULTS["batch_real"])),
                 dsa=str(option(args, "dsa_strategy", DEFAULTS["dsa_strategy"])),
                 checkpoint_every=int(option(args, "checkpoint_every", DEFAULTS["checkpoint_every"])),
                 variants=variants, outer_loop=outer, inner_loop=inner,
                 expert_epochs=int(option(args, "expert_epochs", DEFAULTS["expert_epochs"])),
                 max_start_epoch=int(option(args, "max_start_epoch", DEFAULTS["max_start_epoch"])),
                 syn_steps=int(option(args, "syn_steps", DEFAULTS["syn_steps"])),
                 batch_syn=None if batch_syn is None else int(batch_syn),
                 syn_lr=float(option(args, "syn_lr", DEFAULTS["syn_lr"])), lr_lr=float(option(args, "lr_lr", DEFAULTS["lr_lr"])))
    if cfg.iterations < 0:
        raise DDCodecError(f"--iterations must be 0 or more, not {cfg.iterations}")
    if not (cfg.lr_z >= 0 and cfg.lr_c >= 0):
        raise DDCodecError(f"--lr-z and --lr-c must be 0 or more, not {cfg.lr_z} and {cfg.lr_c}")
    if cfg.batch_real < 1:
        raise DDCodecError(f"--batch-real must be at least 1, not {cfg.batch_real}")
    if cfg.checkpoint_every < 1:
        raise DDCodecError(f"--checkpoint-every must be at least 1, not {cfg.checkpoint_every}")
    parse_strategy(cfg.dsa)
    if loss == "mtt":
        for name, value in (("--expert-epochs", cfg.expert_epochs), ("--max-start-epoch", cfg.max_start_epoch),
                            ("--syn-steps", cfg.syn_steps), ("--batch-syn", 1 if cfg.batch_syn is None else cfg.batch_syn)):
            if value < 1:
                raise DDCodecError(f"{name} must be at least 1, not {value}")
        if not (cfg.syn_lr > 0 and cfg.lr_lr >= 0):
            raise DDCodecError(f"--syn-lr must be more than 0 and --lr-lr 0 or more, not {cfg.syn_lr} and {cfg.lr_lr}")
    return cfg


def mtt_start_limit(cfg: Config, buffer_epochs: int) -> int:
    """Start epochs are drawn from [0, limit): below --max-start-epoch, and with t + M within the buffer's epochs."""
    if cfg.expert_epochs > buffer_epochs:
        raise DDCodecError(f"--expert-epochs {cfg.expert_epochs} is more than the expert buffer's {buffer_epochs} epochs",
                           f"use --expert-epochs {buffer_epochs} or less, or train experts with more --epochs")
    return min(cfg.max_start_epoch, buffer_epochs - cfg.expert_epochs + 1)


def open_experts(args: Any) -> ExpertBuffer | None:
    """The expert buffer for --ld3m-loss mtt (one-line errors before any work), else None."""
    loss = option(args, "ld3m_loss", DEFAULTS["ld3m_loss"])
    expert_dir = option(args, "expert_dir", None)
    if loss != "mtt":
        return None
    if not expert_dir:
        raise DDCodecError("--ld3m-loss mtt needs --expert-dir DIR",
                           "train a buffer first: ddcodec experts train --data SRC --out DIR")
    return ExpertBuffer(expert_dir)


def generation_params(args: Any, prior: LatentPrior, size: tuple[int, int]) -> dict[str, Any]:
    """The bundle's generator params (T, eta, guidance), checked against the prior's scheduler."""
    if prior.kind not in ("class", "text") or prior.scheduler is None:
        raise DDCodecError(f"ld3m needs a diffusion prior, and {prior.source} has none", "pass --generator builtin:default or a model")
    steps = int(option(args, "steps", default_steps(size)))
    num_train = int(prior.scheduler.config.num_train_timesteps)
    if not 1 <= steps <= num_train:
        raise DDCodecError(f"--steps (T) must be between 1 and {num_train}, not {steps}", "the paper uses 10 at 128 px and 20 at 256 px")
    eta = float(option(args, "eta", DEFAULTS["eta"]))
    guidance = float(option(args, "guidance_scale", DEFAULTS["guidance_scale"]))
    if not 0 <= eta <= 1:
        raise DDCodecError(f"--eta must be in [0, 1], not {eta}")
    if guidance < 0:
        raise DDCodecError(f"--guidance-scale must be 0 or more, not {guidance}")
    return {"steps": steps, "eta": eta, "guidance_scale": guidance, "residual": "x0", "code_dtype": "float16"}


def balanced_micro_batch(n: int, limit: int) -> int:
    """The smallest micro-batch that keeps ceil(n / limit) batches: same number of denoiser calls, least padding."""
    limit = max(1, int(limit))
    return -(-n // -(-n // limit))


def load_pools(source: Any, per_class: list[list[int]], candidates: int | None, seed: int,
               size: tuple[int, int]) -> list[torch.Tensor]:
    """Each class's real images (uint8 at the bundle size): all of them, or `candidates` seeded ones."""
    pools = []
    for k in tqdm(range(len(per_class)), desc="ld3m real images", unit="class", leave=False):
        idx = seeded_subset(per_class[k], candidates, derive_seed(seed, k, 0, "candidates"))
        images, _ = load_images(source, idx, size)
        pools.append((images * 255).round().to(torch.uint8))
    return pools


def regeneration_check(distiller: Distiller, manifest: dict[str, Any], items: dict[str, torch.Tensor],
                       prior: LatentPrior, count: int = 4) -> dict[str, Any]:
    """Max |optimised - regenerated| over the fingerprint items: the optimisation path against the bundle's pipeline."""
    pipe = build_pipeline(manifest, items, device=distiller.device, dtype=torch.float32, prior=prior)
    pairs = reference_ids(len(distiller.ids), manifest["variants"], count)
    worst = 0.0
    for v in sorted({v for _, v in pairs}):
        ids = [i for i, vv in pairs if vv == v]
        with torch.enable_grad():
            optimised = distiller.render(v, ids, grad=True).detach()
        worst = max(worst, float((optimised - pipe(ids, v)).abs().max()))
    return {"pairs": len(pairs), "max_abs_diff": worst}


def encode(args: Any) -> tuple[Bundle, Distiller]:
    """Distil, write the bundle, and return it with the distiller (for inspection and tests)."""
    ipc, seed = int(args.ipc), int(args.seed)
    if ipc < 1:
        raise DDCodecError(f"--ipc must be at least 1, not {ipc}")
    experts = open_experts(args)
    source = load_source(args.data, args.split)
    raw = list(source.classes)
    names = readable_names(raw)
    per_class = class_indices(source)
    check_class_sizes(per_class, ipc, names, f"--ipc {ipc}", "lower --ipc")
    candidates = option(args, "candidates", None)
    if candidates is not None and candidates < 1:
        raise DDCodecError(f"--candidates must be at least 1, not {candidates}")
    labels = softlabels.label_options(args, DEFAULTS["variants"], kind="hard")
    if labels.kind != "hard":
        labels = replace(labels, teacher=softlabels.resolve_teacher(labels.teacher, raw))
    device = torch.device(option(args, "device", "cpu"))
    size = image_size(source, per_class[0], args.image_size)
    cfg = config_from_args(args, ipc, size, labels.variants)
    mtt: dict[str, Any] = {}
    if experts is not None:
        layout = param_layout(seeded_convnet(0, len(names), size, torch.device("cpu")))
        experts.check(names, size, convnet_depth(min(size)), layout)
        mtt = {**experts.record(), "start_epoch_limit": mtt_start_limit(cfg, experts.epochs)}
    prior = load_prior(args.generator, num_classes=len(names))
    gen_params = generation_params(args, prior, size)
    teacher = softlabels.open_teacher(labels.teacher, device) if labels.kind == "soft" else None
    params: dict[str, Any] = {"ipc": ipc, "data": str(args.data), "split": args.split, "candidates": candidates,
                              **cfg.record(), **mtt, **labels.record()}
    work = WorkDir(args.out, work_params(args, prior, **params, **gen_params, device=str(device)), discard_stale=args.overwrite)
    prior.to(device)

    picked = pick_random(per_class, ipc, seed, names)
    init = work.get("ld3m-init")
    if init is None:
        images, class_ids = load_images(source, picked, size)
        init = {"z": encode_latents(prior, images, desc="ld3m: VAE-encoding the initial images"), "class_ids": class_ids}
        work.put("ld3m-init", init)
    class_ids = init["class_ids"]
    record = generator_record(prior, "ld3m", gen_params, micro_batch=balanced_micro_batch(len(class_ids), args.micro_batch))
    pipe = LD3MPipeline(prior, record, {"class_ids": class_ids, "latents": init["z"]}, default_prompts(names), seed, size,
                        device=device, dtype=torch.float32)
    c0 = pipe.condition(list(range(len(class_ids))))["encoder_hidden_states"].detach().float()
    # MTT reads no real images here: the experts were trained on them
    pools = load_pools(source, per_class, candidates, seed, size) if cfg.loss != "mtt" else []
    distiller = Distiller(pipe, init["z"], c0, pools, cfg, seed, experts=experts, num_classes=len(names))
    distiller.run(work, label=f"ld3m {cfg.loss}")

    z, c = (t.detach().to(CODE_DTYPE).cpu() for t in distiller.codes())
    timed = distiller.seconds[1:] or distiller.seconds  # the first step includes warm-up
    params.update(source_indices=picked, step_seconds_mean=round(sum(timed) / max(len(timed), 1), 4),
                  step_device=str(device), loss_first=distiller.losses[0] if distiller.losses else None,
                  loss_last=distiller.losses[-1] if distiller.losses else None,
                  probe_loss_start=distiller.probe_start, probe_loss_end=distiller.probe())
    if distiller.syn_lr is not None:
        params["syn_lr_learned"] = float(distiller.syn_lr.detach())
    manifest = new_manifest(method="ld3m", params=params, seed=seed, class_names=names, prompts=default_prompts(names),
                            image_size=size, variants=labels.variants, generator=record)
    payloads = {"items": {"class_ids": class_ids, "latents": z.contiguous(), "cond": c.contiguous()}}
    params["regeneration_check"] = regeneration_check(distiller, manifest, payloads["items"], prior)
    manifest["method"]["params"] = params
    print(f"ld3m: {distiller.iteration} iterations, mean distillation step {params['step_seconds_mean']:.3f} s on {device} "
          f"({len(z)} codes, T={gen_params['steps']}, {cfg.loss}); optimised vs regenerated max |diff| "
          f"{params['regeneration_check']['max_abs_diff']:.3g}")
    manifest, payloads = softlabels.attach_labels(manifest, payloads, labels, teacher, prior, work, device)
    if not is_main():
        return None, distiller
    bundle = write_bundle(args.out, manifest, payloads, overwrite=args.overwrite, prior=prior)
    work.done()
    return bundle, distiller


def run(args: Any) -> Bundle:
    """`ddcodec encode --method ld3m`."""
    return encode(args)[0]
