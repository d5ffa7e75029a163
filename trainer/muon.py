"""Muon for the transformer blocks' matrices and AdamW for the rest, stepped as one optimizer.

torch.optim.Muon orthogonalises each parameter's update as one matrix, and scales its step by
sqrt(max(1, rows / cols)). A matrix that holds several projections at once (c_attn's query, key
and value rows; SwiGLU's gate and up rows: trainer.model.gpt.GPT.fused_rows) is not one operator:
nanochat keeps c_q, c_k and c_v apart and modded-nanogpt orthogonalises Q, K and V one by one. So
Muon is given a view of each row block instead of the fused parameter (the views share its
storage, so Muon's in-place update writes the parameter), and each view's gradient is linked to
its rows of the fused gradient: by a hook each time a backward accumulates into it (so
GradScaler's unscale_ and inf check see them, whoever calls it), and again before the step
(link_grads; trainer.step also calls it before unscale_). Under several ranks trainer.step pauses
the hook (linking_paused) and links after the sync: DDP puts its bucket view in place of the
gradient backward made. zero_grad unlinks them, so between steps they hold no gradient.
The model, its checkpoint keys and its memory are unchanged; Muon's state is one momentum buffer
per block, the fused buffer's bytes in all.
"""
from __future__ import annotations

import contextlib

import torch


def is_block_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """A hidden-layer matrix (Muon's domain): 2-D and inside a transformer block."""
    return p.dim() == 2 and ".h." in f".{name}"


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and torch.optim.AdamW stepped as one torch.optim.Optimizer, so that what
    takes an optimizer takes it: LR schedulers (torch.optim.lr_scheduler checks isinstance),
    step hooks, torch.amp.GradScaler (unscale_ and step through param_groups and step()).

    param_groups are Muon's then AdamW's, the very same dicts, so setting a group's lr (or a
    scheduler's initial_lr) reaches the optimizer that owns it. `state` is both parts' state (read
    only: each part keeps its own); step() steps both; zero_grad is Optimizer's over all groups,
    and the fused parameters' own gradients; state_dict is {'muon': ..., 'adamw': ...} (each
    part's own format, which a checkpoint keeps). `fused`: (parameter, its row-block views) for
    each matrix Muon takes block by block (module docstring)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer,
                 fused: list[tuple[torch.Tensor, list[torch.Tensor]]] = ()):
        self.muon, self.adamw = muon, adamw
        self.fused = list(fused)
        # whether a backward's accumulation links the views (linking_paused); one cell the hooks share
        self._linking = {"on": True}
        # the hooks hold the views and that cell, not the optimizer: no reference cycle, and __del__
        # removes them (a later optimizer over the same model would otherwise find them still linking)
        self._hooks = [p.register_post_accumulate_grad_hook(
            lambda p, views=views, linking=self._linking: _link(p, views) if linking["on"] else None)
            for p, views in self.fused]
        # Optimizer's own set-up (hooks, step patching) over the parts' group dicts, shared, not copied;
        # defaults={} adds no key to any group
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self.defaults = adamw.defaults

    @classmethod
    def over(cls, muon_params: list[tuple[str, torch.nn.Parameter]], fused_rows: dict[str, list[int]],
             adamw: torch.optim.Optimizer, *, lr: float, lr_scale: float, weight_decay: float) -> "MuonAdamW":
        """Muon (momentum 0.95, Nesterov) over the named block matrices, each one of `fused_rows`
        as views of its row blocks, beside `adamw`."""
        params, fused = [], []
        for name, p in muon_params:
            if name in fused_rows:
                views = list(p.detach().split(fused_rows[name], dim=0))  # share p's storage
                fused.append((p, views))
                params += views
            else:
                params.append(p)
        muon = torch.optim.Muon([{"params": params, "lr_scale": lr_scale}], lr=lr, weight_decay=weight_decay,
                                momentum=0.95, nesterov=True)
        return cls(muon, adamw, fused)

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value) -> None:
        # Optimizer.__init__ and __setstate__ assign an empty state here; the parts hold the real one
        pass

    def __del__(self):
        for h in getattr(self, "_hooks", ()):
            h.remove()

    @contextlib.contextmanager
    def linking_paused(self):
        """No linking while a backward accumulates (link_grads then links, before unscale_ and the
        step). For several ranks' DDP: a backward that starts without gradients makes a fresh one
        that DDP copies into its bucket and replaces; views linked to the fresh one would keep it
        alive, a second copy of every fused gradient, through the all-reduce."""
        self._linking["on"] = False
        try:
            yield
        finally:
            self._linking["on"] = True

    def link_grads(self) -> None:
        """Each block view's gradient: its rows of the fused parameter's (a view, no copy), or
        None where the parameter has none. Called before the scaler's unscale_ and by step()."""
        for p, views in self.fused:
            _link(p, views)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both parts; `closure` (re-evaluates the loss) runs once, before them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.link_grads()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        # the block views' gradients are rows of their fused parameter's, linked again before each
        # use: unlinked here, so an old gradient (DDP's bucket, which a rewrap replaces) is not
        # kept alive by them between steps, and not zeroed twice
        for _, views in self.fused:
            for v in views:
                v.grad = None
        super().zero_grad(set_to_none)  # the groups' other parameters
        for p, _ in self.fused:  # the fused parameters themselves, which the groups do not hold
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError for a state dict that is not a MuonAdamW one (an AdamW checkpoint).
        A Muon state saved with one momentum buffer per fused matrix (before Muon took them block
        by block) is split into its blocks' buffers."""
        if not isinstance(state, dict) or set(state) != {"muon", "adamw"}:
            raise ValueError("the optimizer state is not Muon + AdamW's (was the run trained with AdamW?)")
        self.muon.load_state_dict(self._blockwise(state["muon"]))
        self.adamw.load_state_dict(state["adamw"])
        # a part's load_state_dict rebuilds its group dicts: share them again
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    def _blockwise(self, muon_state: dict) -> dict:
        """`muon_state` with a fused matrix's buffer split into its blocks' where it has one per
        matrix (as saved before), else as it is."""
        views = {id(v) for _, vs in self.fused for v in vs}
        rows_of = {id(vs[0]): [v.shape[0] for v in vs] for _, vs in self.fused}
        params = self.muon.param_groups[0]["params"]
        # the parameters as an older state numbered them: one per fused matrix, at its first view
        old = [p for p in params if id(p) not in views or id(p) in rows_of]
        saved = muon_state["param_groups"][0]["params"]
        if not self.fused or len(muon_state["param_groups"]) != 1 or len(saved) != len(old) or len(old) == len(params):
            return muon_state
        state, j = {}, 0
        for i, p in enumerate(old):
            rows = rows_of.get(id(p), [p.shape[0]])
            buf = muon_state["state"].get(saved[i], {}).get("momentum_buffer")
            for k, piece in enumerate(buf.split(rows, dim=0) if buf is not None else [None] * len(rows)):
                if piece is not None:
                    state[j + k] = {"momentum_buffer": piece.clone()}
            j += len(rows)
        group = {**muon_state["param_groups"][0], "params": list(range(j))}
        return {"state": state, "param_groups": [group]}


def _link(p: torch.Tensor, views: list[torch.Tensor]) -> None:
    """The views' gradients: their rows of p's (views, no copy), or None where p has none."""
    grads = p.grad.split([v.shape[0] for v in views], dim=0) if p.grad is not None else [None] * len(views)
    for v, g in zip(views, grads):
        v.grad = g
