"""Tiny models, data and hand-written references shared by the tests (plain torch only)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import default_data_collator

D_IN, HIDDEN, N_CLASSES = 4, 6, 3


class TinyNet(nn.Module):
    """x -> Linear -> [BatchNorm] -> tanh -> Linear -> logits; returns the Trainer's dict."""

    def __init__(self, batchnorm: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.bn = nn.BatchNorm1d(HIDDEN) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(HIDDEN, N_CLASSES)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.bn(self.fc1(x))))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, D_IN, generator=g)
        self.y = torch.randint(0, N_CLASSES, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class RecordingCollator:
    """`default_data_collator` that keeps a copy of every batch it makes, in order."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        batch = default_data_collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def sgd_args(output_dir, **overrides):
    """Arguments under which the reference is a plain SGD step: constant lr, no weight decay."""
    from hf_flat import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def perturbation_by_hand(named_params, grads, method, rho, eta):
    """e for SAM (rho g/||g||) or ASAM (rho T^2 g/||T g||, T=|w|+eta on '*weight*'), written out."""
    if method == "sam":
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        return [rho * g / (norm + 1e-12) for g in grads]
    ts = [(p.detach().abs() + eta) if "weight" in name else torch.ones_like(p) for (name, p) in named_params]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(ts, grads)))
    return [rho * t * t * g / (norm + 1e-12) for t, g in zip(ts, grads)]


def reference_two_pass(
    model, steps, method, rho=0.05, eta=0.01, lr=0.1, max_grad_norm=0.0, autocast=None, perturbed_losses=None
):
    """Train a copy of `model` by hand; `steps` is a list of optimizer steps, each a list of
    micro-batches (or, for several processes, a list of per-rank lists of micro-batches).

    Per micro-batch b of k: g = grad(L_b(w) / k); e from g; g2 = grad(L_b(w + e) / k).
    Final gradient: sum over micro-batches, mean over ranks; optional clipping; SGD step.
    `perturbed_losses`, if a list, receives each step's sum over micro-batches of L_b(w + e) / k,
    averaged over ranks (what the trainer logs as `perturbed_loss` with logging_steps=1).
    """
    model = copy.deepcopy(model).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    device = next(model.parameters()).device  # the reference runs where `model` lives (CPU or CUDA)

    def loss_of(batch, k):
        batch = {key: value.to(device) for key, value in batch.items()}
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else torch.autocast(device.type, enabled=False)
        with ctx:
            return model(**batch)["loss"].float() / k

    for step in steps:
        per_rank = step if isinstance(step[0], list) else [step]
        total = [torch.zeros_like(p) for p in params]
        step_perturbed_loss = 0.0
        for rank_batches in per_rank:
            k = len(rank_batches)
            for batch in rank_batches:
                g = torch.autograd.grad(loss_of(batch, k), params, allow_unused=True)
                g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
                e = perturbation_by_hand(named, g, method, rho, eta) if method != "none" else None
                w = [p.detach().clone() for p in params]
                if e is not None:
                    with torch.no_grad():
                        for p, ei in zip(params, e):
                            p.add_(ei)
                    bn_state = _freeze_bn(model)
                    perturbed = loss_of(batch, k)
                    step_perturbed_loss += perturbed.item() / len(per_rank)
                    g2 = torch.autograd.grad(perturbed, params, allow_unused=True)
                    _unfreeze_bn(bn_state)
                else:
                    g2 = g
                with torch.no_grad():
                    for p, wi in zip(params, w):
                        p.copy_(wi)
                for t, gi in zip(total, g2):
                    if gi is not None:
                        t.add_(gi)
        total = [t / len(per_rank) for t in total]
        if perturbed_losses is not None:
            perturbed_losses.append(step_perturbed_loss)
        if max_grad_norm > 0:
            norm = torch.sqrt(sum((t**2).sum() for t in total))
            coef = min(1.0, max_grad_norm / (norm.item() + 1e-6))
            total = [t * coef for t in total]
        with torch.no_grad():
            for p, t in zip(params, total):
                p.sub_(lr * t)
    return model


def _freeze_bn(model):
    """Remember the BatchNorm buffers, to put them back after pass 2."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]


def _unfreeze_bn(state):
    for m, mean, var, count in state:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


def group_steps(batches, grad_accum, n_steps):
    """The first `n_steps * grad_accum` recorded micro-batches, grouped by optimizer step."""
    return [batches[i * grad_accum : (i + 1) * grad_accum] for i in range(n_steps)]


def assert_same_weights(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


ROBERTA_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "good", "bad", "film", "very", "not", "a", "plot"]
T5_WORDS = ["<pad>", "</s>", "<unk>", "question:", "title:", "context:", "who", "wrote", "hamlet", "shakespeare",
            "paris", "capital", "of", "france", "is", "the", "play", "city"]


def save_tiny_roberta(path) -> str:
    """A 1-layer RoBERTa classifier and its WordLevel tokenizer (`ROBERTA_WORDS`), saved in `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(ROBERTA_WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    RobertaForSequenceClassification(RobertaConfig(vocab_size=len(ROBERTA_WORDS), hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=16,
                                                   max_position_embeddings=40, pad_token_id=0)).save_pretrained(path)
    return str(path)


def save_tiny_t5(path) -> str:
    """A 1-layer T5 and its WordLevel tokenizer (`T5_WORDS`), saved in `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(T5_WORDS), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).save_pretrained(path)
    return str(path)


def random_directions(params, seed, stream, index):
    """Average SAM's z for perturbation number `index` of `stream`, drawn as its docstring says: the
    parameters' elements, flattened and concatenated in order, fall into `SEGMENTS` consecutive
    segments of ceil(N / SEGMENTS); segment j's generator (CPU, seeded with
    `direction_seed(seed, stream, index, j)`) fills, in order, the pieces of the parameters in it,
    each with float32 `normal_`."""
    from hf_flat.methods.avg_sam import SEGMENTS, direction_seed

    flat = [torch.empty(p.numel()) for p in params]
    total = sum(p.numel() for p in params)
    length = max(1, -(-total // SEGMENTS))
    starts = [sum(p.numel() for p in params[:i]) for i in range(len(params))]  # each parameter's first element
    for j in range(SEGMENTS):
        generator = torch.Generator().manual_seed(direction_seed(seed, stream, index, j))
        for i, p in enumerate(params):
            begin, end = max(starts[i], j * length), min(starts[i] + p.numel(), (j + 1) * length)
            if begin < end:
                flat[i][begin - starts[i]: end - starts[i]] = torch.empty(end - begin).normal_(generator=generator)
    return [f.view(p.shape) for f, p in zip(flat, params)]


def reference_where_and_when(
    model, steps, method, rho=0.05, eta=0.01, lr=0.1, max_grad_norm=0.0, scope="micro", m=None,
    perturbed_steps=None, seed=0, perturbed_losses=None, losses=None,
):
    """Train a copy of `model` by hand with SAM / ASAM / average SAM ("avg_sam") at any scope and
    on any schedule. `steps`: a list of optimizer steps, each a list of micro-batches, or for
    several processes a list of per-rank lists. `perturbed_steps`: the 1-based optimizer steps that
    are perturbed (default: all); the others are plain SGD steps.

    - scope "micro": per rank, per micro-batch b of k, per chunk c of `m` samples (the whole
      micro-batch if m is None), with share s = |c| / |b|: g = grad(s L_c(w) / k), e from g (or
      random for avg_sam, drawn from stream str(rank) with a per-rank count), gradient
      grad(s L_c(w + e) / k).
    - scope "step": g = mean over ranks of sum_b grad(L_b(w) / k); one e from it (avg_sam: stream
      "all"); gradient = mean over ranks of sum_b grad(L_b(w + e) / k).
    Then: mean over ranks, optional clipping, SGD step. `perturbed_losses` / `losses` (lists)
    receive per step the mean over ranks of the sums of L(w + e) / k and of L(w) / k (for avg_sam,
    `losses` gets the loss the Trainer reports: L(w + e) on perturbed steps).
    """
    model = copy.deepcopy(model).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    counts = {}  # avg_sam: stream -> perturbations drawn

    def grad_of(batch, scale):
        loss = model(**batch)["loss"] * scale
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)], loss.item()

    def e_for(g, stream):
        if method == "avg_sam":
            index = counts.get(stream, 0)
            counts[stream] = index + 1
            z = random_directions(params, seed, stream, index)
            norm = torch.sqrt(sum((zi**2).sum() for zi in z))
            return [rho * zi / (norm + 1e-12) for zi in z]
        return perturbation_by_hand(named, g, method, rho, eta)

    def at(e, batch, scale):
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        bn_state = _freeze_bn(model) if method != "avg_sam" else []
        g, value = grad_of(batch, scale)
        _unfreeze_bn(bn_state)
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
        return g, value

    def chunks(batch):
        size = len(next(iter(batch.values())))
        step = size if m is None else m
        return [({k: v[i : i + step] for k, v in batch.items()}, min(step, size - i) / size) for i in range(0, size, step)]

    for t, step in enumerate(steps, start=1):
        per_rank = step if isinstance(step[0], list) else [step]
        perturbed = perturbed_steps is None or t in perturbed_steps
        total = [torch.zeros_like(p) for p in params]
        step_loss = step_perturbed = 0.0
        if perturbed and scope == "step":
            g_step = [torch.zeros_like(p) for p in params]
            for rank_batches in per_rank:
                k = len(rank_batches)
                for batch in rank_batches:
                    if method == "avg_sam":
                        continue
                    g, value = grad_of(batch, 1 / k)
                    step_loss += value / len(per_rank)
                    for acc, gi in zip(g_step, g):
                        acc.add_(gi / len(per_rank))
            e = e_for(g_step, "all")
            for rank_batches in per_rank:
                k = len(rank_batches)
                for batch in rank_batches:
                    g, value = at(e, batch, 1 / k)
                    step_perturbed += value / len(per_rank)
                    for acc, gi in zip(total, g):
                        acc.add_(gi / len(per_rank))
        else:
            for rank, rank_batches in enumerate(per_rank):
                k = len(rank_batches)
                for batch in rank_batches:
                    for chunk, share in chunks(batch) if perturbed else [(batch, 1.0)]:
                        if not perturbed:
                            g, value = grad_of(chunk, 1 / k)
                            step_loss += value / len(per_rank)
                        elif method == "avg_sam":
                            g, value = at(e_for(None, str(rank)), chunk, share / k)
                            step_perturbed += value / len(per_rank)
                        else:
                            g1, value = grad_of(chunk, share / k)
                            step_loss += value / len(per_rank)
                            g, value = at(e_for(g1, str(rank)), chunk, share / k)
                            step_perturbed += value / len(per_rank)
                        for acc, gi in zip(total, g):
                            acc.add_(gi / len(per_rank))
        if perturbed_losses is not None:
            perturbed_losses.append(step_perturbed if perturbed else None)
        if losses is not None:
            losses.append(step_perturbed if (perturbed and method == "avg_sam") else step_loss)
        if max_grad_norm > 0:
            norm = torch.sqrt(sum((g**2).sum() for g in total))
            coef = min(1.0, max_grad_norm / (norm.item() + 1e-6))
            total = [g * coef for g in total]
        with torch.no_grad():
            for p, g in zip(params, total):
                p.sub_(lr * g)
    return model


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a):
    return torch.sqrt(_dot(a, a))


def reference_flat_family(
    model, steps, method, rho=0.05, lr=0.1, max_grad_norm=0.0, scope="micro", alpha=None, rho_min=None, lrs=None,
    k=5, start=0.0, beta=1.0, gamma=0.5, seed=0, perturbed_steps=None, perturbed_losses=None, losses=None, unused=(),
):
    """Train a copy of `model` by hand with GSAM, LookSAM or ESAM, written out from their
    definitions (notes/issue14_spec.md). `steps`: a list of optimizer steps, each a list of
    micro-batches, or for several processes a list of per-rank lists (k: micro-batches per rank).

    - "gsam" (`alpha` default 0.4): per group (scope "micro": each micro-batch of each rank; "step":
      the whole step, all-reduced), g = grad(L/k) at w, e = rho_t g/(||g|| + 1e-12), g_p = grad(L/k)
      at w + e, cos = <g, g_p>/(||g|| ||g_p|| + 1e-12), g_perp = g - cos ||g|| g_p/(||g_p|| + 1e-12);
      gradient g_p - alpha g_perp (micro: summed per rank, then mean over ranks). rho_t = rho, or with
      `rho_min`: rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min) over `lrs` (rho if equal).
      `perturbed_steps` (1-based; default all): the others are plain SGD steps.
    - "looksam" (`alpha` default 0.7, `k`, `start`): with s = max(1, ceil(start T)), step t is a SAM
      step iff t >= s and (t - s) % k == 0: g, e = rho g/(||g|| + 1e-12), g_s at w + e (whole step,
      mean over ranks), update g_s, g_v = g_s - <g_s, e>/||e||^2 e. Other steps from s on:
      g + alpha ||g||/(||g_v|| + 1e-12) g_v. Steps before s: plain.
    - "esam" (`beta`, `gamma`, `seed`): per micro-batch b of each rank, S = all tensors (beta = 1)
      or `hf_flat.methods.esam.esam_subset(seed, str(rank), index, n, beta)` (index counted per rank);
      e = (rho/beta) g_S/(||g_S|| + 1e-12) on S (`unused`: names of tensors the forward does not use,
      left out of S; S empty: every tensor, rho unscaled); per-sample losses at w and at w + e; B+ = the
      ceil(gamma |b|) samples with the largest rise; gradient grad(L_{B+}(w + e)/k).
      `perturbed_steps` as for GSAM.
    Then: mean over ranks, optional clipping, SGD step with lr `lrs[t - 1]` (default `lr`).
    `losses` / `perturbed_losses` (lists) receive per step the mean over ranks of the sums of
    L_b(w)/k and of L_b(w + e)/k (ESAM: the whole micro-batch at w + e; None on steps without e).
    """
    import math
    from fractions import Fraction

    model = copy.deepcopy(model).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total_steps = len(steps)
    lrs = [lr] * total_steps if lrs is None else list(lrs)
    if alpha is None:
        alpha = {"gsam": 0.4, "looksam": 0.7}.get(method, 0.0)
    counts = {}  # esam: stream -> perturbations so far
    g_v = None  # looksam

    def grad_of(batch, scale):
        out = model(**batch)
        loss = out["loss"] * scale
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)], loss.item(), out

    def shifted(e, fn):
        """fn() at w + e (BatchNorm frozen), then w restored exactly."""
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        bn_state = _freeze_bn(model)
        try:
            return fn()
        finally:
            _unfreeze_bn(bn_state)
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)

    def step_gradient(per_rank, e=None):
        """Mean over ranks of sum_b grad(L_b(w [+ e]) / k), and the same of the loss values."""
        total, value = [torch.zeros_like(p) for p in params], 0.0
        for rank_batches in per_rank:
            kk = len(rank_batches)
            for batch in rank_batches:
                g, v, _ = grad_of(batch, 1 / kk) if e is None else shifted(e, lambda b=batch, kk=kk: grad_of(b, 1 / kk))
                value += v / len(per_rank)
                for acc, gi in zip(total, g):
                    acc.add_(gi / len(per_rank))
        return total, value

    def sam_e(g, radius):
        n = _norm(g)
        return [radius * gi / (n + 1e-12) for gi in g]

    def gsam_gradient(g, gp):
        ng, ngp = _norm(g), _norm(gp)
        cos = _dot(g, gp) / (ng * ngp + 1e-12)
        g_perp = [gi - cos * ng * gpi / (ngp + 1e-12) for gi, gpi in zip(g, gp)]
        return [gpi - alpha * gperp for gpi, gperp in zip(gp, g_perp)]

    def rho_at(t):
        if rho_min is None or max(lrs) == min(lrs):
            return rho
        return rho_min + (rho - rho_min) * (lrs[t - 1] - min(lrs)) / (max(lrs) - min(lrs))

    def esam_chosen(rank, n):
        stream = str(rank)
        index = counts.get(stream, 0)
        counts[stream] = index + 1
        if beta == 1:
            return [True] * n
        from hf_flat.methods.esam import esam_subset

        chosen = [c and name not in unused for c, (name, _) in zip(esam_subset(seed, stream, index, n, beta), named)]
        return chosen if any(chosen) else None  # an empty draw (or of unused tensors only): every tensor, rho unscaled

    first = max(1, math.ceil(Fraction(repr(float(start))) * total_steps))

    for t, step in enumerate(steps, start=1):
        per_rank = step if isinstance(step[0], list) else [step]
        perturbed = perturbed_steps is None or t in perturbed_steps
        step_perturbed = None
        if method == "looksam":
            g, step_loss = step_gradient(per_rank)
            if t < first:
                total = g
            elif (t - first) % k == 0:
                e = sam_e(g, rho)
                g_s, step_perturbed = step_gradient(per_rank, e)
                coef = _dot(g_s, e) / _dot(e, e)
                g_v = [gs - coef * ei for gs, ei in zip(g_s, e)]
                total = g_s
            else:
                scale = alpha * _norm(g) / (_norm(g_v) + 1e-12)
                total = [gi + scale * gv for gi, gv in zip(g, g_v)]
        elif not perturbed:
            total, step_loss = step_gradient(per_rank)
        elif method == "gsam" and scope == "step":
            g, step_loss = step_gradient(per_rank)
            g_p, step_perturbed = step_gradient(per_rank, sam_e(g, rho_at(t)))
            total = gsam_gradient(g, g_p)
        elif method in ("gsam", "esam"):
            total = [torch.zeros_like(p) for p in params]
            step_loss = step_perturbed = 0.0
            for rank, rank_batches in enumerate(per_rank):
                kk = len(rank_batches)
                for batch in rank_batches:
                    g, value, out = grad_of(batch, 1 / kk)
                    step_loss += value / len(per_rank)
                    if method == "gsam":
                        g_p, value = shifted(sam_e(g, rho_at(t)), lambda b=batch, kk=kk: grad_of(b, 1 / kk)[:2])
                        contribution = gsam_gradient(g, g_p)
                    else:
                        chosen = esam_chosen(rank, len(params))
                        scale_beta = beta if chosen is not None else 1.0
                        chosen = chosen or [True] * len(params)
                        g_s = [gi if c else torch.zeros_like(gi) for gi, c in zip(g, chosen)]
                        norm_s = _norm([gi for gi, c in zip(g, chosen) if c])
                        e = [(rho / scale_beta) * gi / (norm_s + 1e-12) for gi in g_s]
                        labels = batch["labels"]
                        at_w = F.cross_entropy(out["logits"].detach(), labels, reduction="none")

                        def esam_pass(b=batch, at_w=at_w, labels=labels, kk=kk):
                            with torch.no_grad():
                                selection = model(**b)
                            rise = F.cross_entropy(selection["logits"], labels, reduction="none") - at_w
                            n_selected = math.ceil(gamma * len(labels))
                            keep = torch.topk(rise, n_selected).indices.sort().values
                            g2, _, _ = grad_of({key: v[keep] for key, v in b.items()}, 1 / kk)
                            return g2, selection["loss"].item() / kk

                        contribution, value = shifted(e, esam_pass)
                    step_perturbed += value / len(per_rank)
                    for acc, ci in zip(total, contribution):
                        acc.add_(ci / len(per_rank))
        else:
            raise ValueError(f"no reference for method={method!r} with scope={scope!r}")
        if losses is not None:
            losses.append(step_loss)
        if perturbed_losses is not None:
            perturbed_losses.append(step_perturbed)
        if max_grad_norm > 0:
            norm = _norm(total)
            coef = min(1.0, max_grad_norm / (norm.item() + 1e-6))
            total = [g * coef for g in total]
        with torch.no_grad():
            for p, g in zip(params, total):
                p.sub_(lrs[t - 1] * g)
    return model


# ---- tiny language models for TRL's trainers ----------------------------------------------------------
LM_WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + "the a cat dog sat ran on mat log big small red blue and".split()
LM_TEXTS = ["the cat sat on the mat", "a dog ran on a log", "the big red dog sat", "a small blue cat ran",
            "the dog sat on a mat", "a cat ran on the log", "the small dog ran", "a big blue cat sat"]


def tiny_lm_tokenizer():
    """A WordLevel tokenizer over `LM_WORDS` with pad / bos / eos tokens, as TRL's trainers need."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(seed: int = 0):
    """A 1-layer Llama causal LM over `LM_WORDS`, built from its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(LM_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(config)


def write_sharded(path, whole: dict, processes: int, unsharded=None, meta=None, flat_method="swa"):
    """Write the flat state file `path` as `processes` processes of an FSDP2 run would: each
    process's shard file holds torch.chunk's rows of every tensor of `whole`; the main file holds
    `unsharded` tensors and `meta` and lists the shard files."""
    from hf_flat.sharding import Rows, ShardedTensor
    from hf_flat.state_file import save_flat_state, save_shard_file

    for index in range(processes):
        tensors = {}
        for key, t in whole.items():
            chunk = -(-t.shape[0] // processes)
            start, stop = min(index * chunk, t.shape[0]), min((index + 1) * chunk, t.shape[0])
            tensors[key] = ShardedTensor(t[start:stop], Rows(start, stop, tuple(t.shape)))
        save_shard_file(path, [(tensors, {})], index, processes)
    save_flat_state(path, [(dict(unsharded or {}), dict(meta or {"averaging": "swa"}))], flat_method, shards=processes)
    return path
