"""The gate's features and the cascade on a dense-exit model, against max-prob (the figures in docs/calibrate.md
and benchmarks/results/gate_features.md). Three steps, each a subcommand; the first writes the teacher-forced
statistics to $LITE_HOME/exp (float16 states, ~0.3 GB per 100 prompts), the others read them.

    python benchmarks/gate_features.py collect heldout 93 2    # own answers to the shipped model's held-out rows
    python benchmarks/gate_features.py collect dolly 320 2     # ... and to Dolly prompts (gate training)
    python benchmarks/gate_features.py frontier module,state,state+delta 0
    python benchmarks/gate_features.py cascade state+delta 0

Run of record (2026-12-07, the dense-affine run, AMD EPYC 2 cores, float32): collect 217 s + 1221 s,
frontier 350 s, cascade 200 s.
"""
import os
import sys

HOME = os.environ.get("LITE_HOME", os.path.expanduser("~/.cache/lite"))
MODEL = os.environ.get("MODEL", os.path.join(HOME, "runs", "dense-affine"))


def collect(argv):
    import time, numpy as np, torch
    from lite.calibration.scoring import answer_sequences, score_sequences
    from lite.model.config import LiteConfig
    from lite.model.loading import load_model, resolve_model
    from lite.model.prompts import default_format, encode_prompt
    from lite.training.data import load_heldout, read_examples
    from lite.training.own_answers import own_answers
    torch.set_num_threads(int(argv[3]) if len(argv) > 3 else 2)
    lm = load_model(MODEL, dtype="float32", device="cpu")
    fmt = default_format(lm)
    which, n = argv[1], int(argv[2])
    if which == "dolly":
        rows, _ = read_examples([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "train", "dolly15k_prompts.jsonl")])
        rows = rows[:n]
    else:
        rows = load_heldout(LiteConfig.load(resolve_model("smollm2-135m-lite")))[:n]
    prompts = [encode_prompt(lm.tokenizer, r.instruction, r.input, fmt) for r in rows]
    prompts = [p for p in prompts if len(p) < 320]
    t0 = time.time()
    answers = own_answers(lm, prompts, max_new_tokens=64, batch_size=8,
                          progress=lambda line: print(f"{line} {time.time()-t0:.0f}s", flush=True)).ids
    layers = [k for k in lm.exit_layers if k < lm.num_layers]
    # one teacher-forced pass per answer: agreement, max-prob, the exit-module state and state+delta features
    s = score_sequences(lm, answer_sequences(zip(prompts, answers)), layers=layers, states=("exit", "state+delta"),
                        progress=lambda e, total: e % 20 == 0 and print(f"scored {e} {time.time()-t0:.0f}s", flush=True))
    d = lm.hidden_size
    kept = np.array([e for e, a in enumerate(answers) if a])  # index: the prompt each token belongs to
    np.savez(f"{HOME}/exp/gate_{which}.npz", agree=s.agree, maxprob=s.confidences["max_prob"],
             state=s.states["state+delta"][..., :d].astype(np.float16), module=s.states["exit"].astype(np.float16),
             delta=s.states["state+delta"][..., d:].astype(np.float16), index=kept[s.index], layers=np.array(layers))
    print("done", time.time() - t0)


def frontier(argv):
    import sys, json, time, numpy as np, torch
    from lite.calibration.ceiling import frontier, oracle_saving
    from lite.decoding.gate import train_gate
    torch.set_num_threads(2)
    tr = np.load(HOME + "/exp/gate_dolly.npz"); te = np.load(HOME + "/exp/gate_heldout.npz")
    layers = [int(k) for k in tr["layers"]]; L = 30
    def best(points, bar):
        ok = [p.saving for p in points if p.agreement >= bar]
        return max(ok) if ok else 0.0
    def report(name, scores, agree):
        pts = frontier(scores, agree, layers, L, cuts=120)
        r = {b: best(pts, b) for b in (0.85, 0.90, 0.95)}
        print(f"{name:40s} " + "  ".join(f"@{b:.2f} {100*v:5.1f}%" for b, v in r.items()), flush=True)
        return r
    agree = te["agree"]
    print(f"held-out tokens {agree.shape[1]}, train tokens {tr['agree'].shape[1]}, oracle {100*oracle_saving(agree, layers, L):.1f}%")
    out = {"maxprob (full head)": report("maxprob (full head)", te["maxprob"].astype(np.float64), agree)}
    def feats(d, kind):
        parts = {"module": [d["module"]], "state": [d["state"]], "state+delta": [d["state"], d["delta"]],
                 "module+delta": [d["module"], d["delta"]]}[kind]
        return np.concatenate([p.astype(np.float32) for p in parts], axis=-1)
    for kind in argv[1].split(","):
        for hidden in [int(h) for h in argv[2].split(",")]:
            t0 = time.time()
            g = train_gate(feats(tr, kind), tr["agree"], layers, hidden=hidden, steps=int(argv[3]) if len(argv) > 3 else 300)
            x = feats(te, kind)
            with torch.no_grad():
                s = np.stack([g.probability(k, torch.from_numpy(x[i])).numpy() for i, k in enumerate(layers)]).astype(np.float64)
            name = f"gate {kind} h={hidden} ({time.time()-t0:.0f}s)"
            out[name] = report(name, s, agree)
    json.dump(out, open(f"{HOME}/exp/frontier_{argv[1]}_{argv[2]}.json", "w"), indent=1)


def cascade(argv):
    import sys, json, numpy as np, torch
    from lite.decoding.gate import train_gate
    from lite.decoding.cost import ModelShape
    torch.set_num_threads(2)
    tr = np.load(HOME + "/exp/gate_dolly.npz"); te = np.load(HOME + "/exp/gate_heldout.npz")
    layers = [int(k) for k in tr["layers"]]; L = 30; E = len(layers)
    S = ModelShape(30, 576, 1536, 9, 3, 64, 49152)
    blk, fill, head, ev = S.block_flops(256), S.kv_fill_flops(), S.head_flops(), 2 * 576 * 4096 + 5 * 4096
    mod = 2 * 576 * 576
    full = L * blk + head
    kind, hidden = argv[1], int(argv[2])
    def feats(d):
        parts = [d["state"]] + ([d["delta"]] if "delta" in kind else [])
        return np.concatenate([p.astype(np.float32) for p in parts], -1)
    cache = f"{HOME}/exp/scores_{kind}_{hidden}.npy"
    try:
        gs = np.load(cache)
    except FileNotFoundError:
        g = train_gate(feats(tr), tr["agree"], layers, hidden=hidden)
        x = feats(te)
        with torch.no_grad():
            gs = np.stack([g.probability(k, torch.from_numpy(x[i])).numpy() for i, k in enumerate(layers)])
        np.save(cache, gs)
    gflops = 2 * feats(te).shape[-1] * max(hidden, 1)
    agree, mp = te["agree"], te["maxprob"]
    N = agree.shape[1]
    def run(g, c):
        """per token: first layer where gate>=g and maxprob>=c; compute and agreement."""
        passed = gs >= g                    # head read here
        leave = passed & (mp >= c)
        any_ = leave.any(0); first = np.argmax(leave, 0)
        e_idx = np.where(any_, first, E)    # E = reaches L
        el = np.where(any_, np.array(layers)[np.minimum(first, E - 1)], L)
        # checks happen at exits up to and including the exit index
        upto = np.arange(E)[:, None] <= np.where(any_, first, E - 1)[None, :]
        heads = (passed & upto).sum(0)
        comp = el * blk + (L - el) * fill + upto.sum(0) * gflops + heads * (mod + ev) + np.where(any_, 0, head)
        ag = np.where(any_, agree[np.minimum(first, E - 1), np.arange(N)], True)
        return 1 - comp.mean() / full, ag.mean(), 1 - el.mean() / L
    res = []
    for g in [0.0] + list(np.quantile(gs, np.linspace(0.3, 0.98, 25))):
        for c in np.quantile(mp, np.linspace(0.2, 0.995, 40)):
            res.append((g, c) + run(g, c))
    res.append((2, 2) + run(2.0, 2.0))
    def best(bar, idx):
        ok = [r for r in res if r[3] >= bar]; b = max(ok, key=lambda r: r[idx]); return b
    print(f"{kind} h={hidden}: compute of the full step {full/1e6:.0f} MFLOPs; check: gate {gflops/1e3:.1f}k, head+module {(ev+mod)/1e6:.1f}M")
    for bar in (0.85, 0.90, 0.95):
        b = best(bar, 2); m = [r for r in res if r[0] == 0.0 and r[3] >= bar]; m = max(m, key=lambda r: r[2])
        gate_only = [r for r in res if r[3] >= bar and r[1] <= mp.min()]; 
        print(f"@{bar:.2f}: cascade compute saving {100*b[2]:5.1f}% (layers {100*b[4]:.1f}%, g={b[0]:.3f} c={b[1]:.3f}) | "
              f"max-prob at every exit: compute {100*m[2]:5.1f}% (layers {100*m[4]:.1f}%)")
    # gate alone (its own cut, head only at exit)
    def gate_alone(t):
        leave = gs >= t; any_ = leave.any(0); first = np.argmax(leave, 0)
        el = np.where(any_, np.array(layers)[np.minimum(first, E-1)], L)
        upto = (np.arange(E)[:, None] <= np.where(any_, first, E - 1)[None, :]).sum(0)
        comp = el * blk + (L - el) * fill + upto * gflops + np.where(any_, mod + ev, head)
        ag = np.where(any_, agree[np.minimum(first, E - 1), np.arange(N)], True)
        return 1 - comp.mean() / full, ag.mean(), 1 - el.mean() / L
    ga = [gate_alone(t) for t in np.quantile(gs, np.linspace(0.5, 0.9999, 200))]
    for bar in (0.85, 0.90, 0.95):
        b = max([r for r in ga if r[1] >= bar] or [(0, 1, 0)], key=lambda r: r[0])
        print(f"@{bar:.2f}: gate alone compute saving {100*b[0]:5.1f}% (layers {100*b[2]:.1f}%)")


if __name__ == "__main__":
    {"collect": collect, "frontier": frontier, "cascade": cascade}[sys.argv[1]]([sys.argv[0]] + sys.argv[2:])
