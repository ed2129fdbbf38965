"""Functions run inside spawned gloo ranks (importable by the children: the test adds this folder to sys.path).

Each case builds the full model and data from one seed on every rank, runs the single-process reference (a plain
loop over micro-batches, `loss.backward()` each) and the pipeline, and returns plain numbers for the tests.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from seekstack.pipeline import DualPipe, DualPipeV, LinearPipeline, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from seekstack.pipeline.models import MLPStage, OverlappedMLPStage, mse

MB, SEQ = 3, 5


def cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / ((x * x).sum() + (y * y).sum())).item()


def make(stage_cls, n_stages: int, num_chunks: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    stages = [stage_cls(hidden) for _ in range(n_stages)]
    x = torch.randn(num_chunks * MB, SEQ, hidden)
    y = torch.randn(num_chunks * MB, SEQ, hidden)
    return stages, x, y


def reference(stages, x, y, num_chunks: int):
    """Single-process reference: the full model over each micro-batch in turn."""
    ref = copy.deepcopy(stages)
    losses, outs = [], []
    for xc, yc in zip(x.tensor_split(num_chunks), y.tensor_split(num_chunks)):
        h = xc
        for s in ref:
            h = s(h)
        loss = mse(h, yc)
        loss.backward()
        losses.append(loss.detach())
        outs.append(h.detach())
    grads = [[p.grad.clone() for p in s.parameters()] for s in ref]
    return torch.stack(losses), torch.cat(outs), grads


def grad_diff(module, ref_grads) -> float:
    return max(cal_diff(p.grad, g) for p, g in zip(module.parameters(), ref_grads))


def pp_rank(group, mapping) -> int:
    g = dist.get_rank(group)
    return mapping[g] if mapping else g


def shapes(pipe, hidden, module_level=False):
    if module_level:
        set_p2p_tensor_shapes([(MB, SEQ, hidden)])
        set_p2p_tensor_dtype(torch.float32)
    else:
        pipe.set_p2p_tensor_shapes([(MB, SEQ, hidden)])
        pipe.set_p2p_tensor_dtype(torch.float32)


def dualpipe_case(group, mapping, num_chunks, stage_cls, seed, hidden=8, module_level=False, steps=2):
    n = dist.get_world_size(group)
    stages, x, y = make(stage_cls, n, num_chunks, hidden, seed)
    ref_loss, ref_out, ref_grads = reference(stages, x, y, num_chunks)
    r = pp_rank(group, mapping)
    pipe = DualPipe(
        (copy.deepcopy(stages[r]), copy.deepcopy(stages[n - 1 - r])), process_group=group, rank_mapping=mapping
    )
    shapes(pipe, hidden, module_level)
    half = num_chunks // 2 * MB
    args, kw = (), {}
    if r == 0:
        args, kw = (x[:half],), {"criterion": mse, "labels": [y[half:]]}
        want_loss, want_out = ref_loss.chunk(2)[1], ref_out[half:]
    elif r == n - 1:
        args, kw = (x[half:],), {"criterion": mse, "labels": [y[:half]]}
        want_loss, want_out = ref_loss.chunk(2)[0], ref_out[:half]
    res = {"rank": r, "steps": []}
    for step in range(steps):
        loss, outs = pipe.step(*args, num_chunks=num_chunks, **kw)
        scale = step + 1  # grads accumulate over steps
        res["steps"].append({
            "loss_ok": torch.equal(loss, want_loss) if r in (0, n - 1) else loss is None,
            "outs_none": outs is None,
            "grad_diff0": grad_diff(pipe.module[0], [g * scale for g in ref_grads[r]]),
            "grad_diff1": grad_diff(pipe.module[1], [g * scale for g in ref_grads[n - 1 - r]]),
        })  # fmt: skip
    res["w_applied"] = pipe.weight_grad_store.applied
    with torch.no_grad():
        before = [p.grad.clone() for p in pipe.parameters()]
        loss, outs = pipe.step(*args, num_chunks=num_chunks, return_outputs=True, **kw)
        res["infer_grads_untouched"] = all(torch.equal(p.grad, b) for p, b in zip(pipe.parameters(), before))
    if r in (0, n - 1):
        res["infer_loss_ok"] = torch.equal(loss, want_loss)
        res["infer_out_ok"] = torch.equal(outs, want_out)
    else:
        res["infer_loss_ok"] = res["infer_out_ok"] = loss is None and outs is None
    return res


def dualpipev_case(group, mapping, num_chunks, stage_cls, seed, hidden=8):
    n = dist.get_world_size(group)
    stages, x, y = make(stage_cls, 2 * n, num_chunks, hidden, seed)
    ref_loss, ref_out, ref_grads = reference(stages, x, y, num_chunks)
    r = pp_rank(group, mapping)
    pipe = DualPipeV(
        (copy.deepcopy(stages[r]), copy.deepcopy(stages[2 * n - 1 - r])), process_group=group, rank_mapping=mapping
    )
    return pipe, (x, y, ref_loss, ref_out, ref_grads, r, n)


def dualpipev_check(pipe, data, num_chunks, hidden=8):
    x, y, ref_loss, ref_out, ref_grads, r, n = data
    shapes(pipe, hidden)
    args, kw = ((x,), {"criterion": mse, "labels": [y]}) if r == 0 else ((), {})
    loss, outs = pipe.step(*args, num_chunks=num_chunks, **kw)
    res = {
        "rank": r,
        "loss_ok": torch.equal(loss, ref_loss) if r == 0 else loss is None,
        "outs_none": outs is None,
        "grad_diff0": grad_diff(pipe.module[0], ref_grads[r]),
        "grad_diff1": grad_diff(pipe.module[1], ref_grads[2 * n - 1 - r]),
    }
    with torch.no_grad():
        loss, outs = pipe.step(*args, num_chunks=num_chunks, return_outputs=True, **kw)
    res["infer_ok"] = torch.equal(loss, ref_loss) and torch.equal(outs, ref_out) if r == 0 else outs is None
    return res


def linear_case(schedule, num_chunks, seed, hidden=8):
    n = dist.get_world_size()
    stages, x, y = make(MLPStage, n, num_chunks, hidden, seed)
    ref_loss, ref_out, ref_grads = reference(stages, x, y, num_chunks)
    r = dist.get_rank()
    pipe = LinearPipeline(copy.deepcopy(stages[r]), schedule=schedule)
    shapes(pipe, hidden)
    args = (x,) if r == 0 else ()
    kw = {"criterion": mse, "labels": [y]} if r == n - 1 else {}
    loss, _ = pipe.step(*args, num_chunks=num_chunks, **kw)
    return {
        "loss_ok": torch.equal(loss, ref_loss) if r == n - 1 else loss is None,
        "grad_diff": grad_diff(pipe.module[0], ref_grads[r]),
    }


def error_cases(rank, world):
    """ValueErrors raised before any communication, so no rank is left waiting."""
    errs = {}

    def catch(name, fn):
        try:
            fn()
            errs[name] = "no error"
        except ValueError as exc:
            errs[name] = str(exc)

    g3 = dist.new_group([0, 1, 2])
    if rank < 3:
        catch("odd_ranks", lambda: DualPipe((MLPStage(4), MLPStage(4)), process_group=g3))
    pipe = DualPipe((MLPStage(4), MLPStage(4)))
    shapes(pipe, 4)
    x = torch.randn(8 * MB, SEQ, 4)
    catch("odd_chunks", lambda: pipe.step(x, num_chunks=9, criterion=mse, labels=[x]))
    catch("few_chunks", lambda: pipe.step(x, num_chunks=6, criterion=mse, labels=[x]))
    if rank in (0, world - 1):  # only these ranks check the criterion; the others would wait for them
        catch("no_criterion", lambda: pipe.step(x, num_chunks=8, labels=[x]))
    v = DualPipeV((MLPStage(4), MLPStage(4)))
    catch("v_few_chunks", lambda: v.step(x, num_chunks=2 * world - 1))
    catch("rank_mapping", lambda: DualPipeV((MLPStage(4), MLPStage(4)), rank_mapping=[0, 0, 1, 2]))
    catch("schedule", lambda: LinearPipeline(MLPStage(4), schedule="2f2b"))
    catch("modules", lambda: DualPipe((MLPStage(4),)))
    return errs


def run_world4(rank, world):
    res = {}
    g = dist.group.WORLD
    res["dualpipe_zb"] = dualpipe_case(g, None, 8, MLPStage, seed=1)
    res["dualpipe_plain"] = dualpipe_case(g, None, 10, lambda h: MLPStage(h, deferrable=False), seed=2, steps=1)
    res["dualpipe_hook"] = dualpipe_case(g, None, 8, OverlappedMLPStage, seed=3, steps=1, module_level=True)
    pipe, data = dualpipev_case(g, None, 9, MLPStage, seed=4)
    res["dualpipev"] = dualpipev_check(pipe, data, 9)
    for sched in ("gpipe", "1f1b", "zb1p"):
        res[f"linear_{sched}"] = linear_case(sched, 6, seed=5)
    # Two 2-rank groups at once; the second maps its ranks in reverse. Seeds agree within a group.
    g01, g23 = dist.new_group([0, 1]), dist.new_group([2, 3])
    mine, mapping, seed = (g01, None, 6) if rank < 2 else (g23, [1, 0], 7)
    res["sub_dualpipe"] = dualpipe_case(mine, mapping, 4, MLPStage, seed=seed, steps=1)
    # Two DualPipeV pipelines with different widths (hence P2P shapes) live side by side and step in turn.
    pa, da = dualpipev_case(mine, mapping, 4, MLPStage, seed=seed + 10, hidden=8)
    pb, db = dualpipev_case(mine, mapping, 6, OverlappedMLPStage, seed=seed + 20, hidden=6)
    res["coexist_a"] = dualpipev_check(pa, da, 4, hidden=8)
    res["coexist_b"] = dualpipev_check(pb, db, 6, hidden=6)
    res["errors"] = error_cases(rank, world)
    return res


def run_world2(rank, world):
    res = {}
    g = dist.group.WORLD
    res["dualpipe_zb"] = dualpipe_case(g, None, 6, MLPStage, seed=11, steps=1)
    res["dualpipe_plain"] = dualpipe_case(g, None, 4, lambda h: MLPStage(h, deferrable=False), seed=12, steps=1)
    pipe, data = dualpipev_case(g, None, 5, OverlappedMLPStage, seed=13)
    res["dualpipev"] = dualpipev_check(pipe, data, 5)
    # DualPipeV on one rank (a singleton group each): the whole V turns locally.
    solo = [dist.new_group([0]), dist.new_group([1])][rank]
    pipe, data = dualpipev_case(solo, None, 3, MLPStage, seed=14 + rank)
    res["dualpipev_solo"] = dualpipev_check(pipe, data, 3)
    return res
