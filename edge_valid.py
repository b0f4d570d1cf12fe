import torch, ladle, math
b = {"w": torch.zeros(4)}; m = {"w": torch.ones(4)}
def tryit(name, f):
    try: r = f(); print(name, "OK", r["w"].tolist() if isinstance(r, dict) else r)
    except Exception as e: print(name, type(e).__name__, str(e)[:150])
for d in (0, -0.1, 1.0000001, float("nan"), float("inf"), 1e-300, True, "0.5", 2**-25):
    tryit(f"ties density={d!r}", lambda: ladle.ties([m], b, density=d))
    tryit(f"dare density={d!r}", lambda: ladle.dare([m], b, density=d))
for s in (float("nan"), float("inf"), True):
    tryit(f"ta scale={s!r}", lambda: ladle.task_arithmetic([m], b, scale=s))
    tryit(f"ties scale={s!r}", lambda: ladle.ties([m], b, scale=s))
tryit("soup weights sum 0", lambda: ladle.uniform_soup([m, m], weights=[1, -1]))
tryit("soup weights len", lambda: ladle.uniform_soup([m, m], weights=[1]))
tryit("soup weights nan", lambda: ladle.uniform_soup([m, m], weights=[1, float("nan")]))
tryit("ta weights len", lambda: ladle.task_arithmetic([m, m], b, weights=[1]))
tryit("stock N=1", lambda: ladle.model_stock([m], b))
tryit("slerp N=3", lambda: ladle.slerp([m, m, m]))
tryit("ties trim bad", lambda: ladle.ties([m], b, trim="row"))
tryit("dare combine bad", lambda: ladle.dare([m], b, combine="mean"))
tryit("dare seed float", lambda: ladle.dare([m], b, seed=1.5))
tryit("dare seed 1.0", lambda: ladle.dare([m], b, seed=1.0))
tryit("empty models", lambda: ladle.uniform_soup([]))
tryit("ta empty", lambda: ladle.task_arithmetic([], b))
