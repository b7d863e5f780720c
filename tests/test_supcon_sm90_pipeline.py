"""A model of the Hopper SupCon kernels' synchronisation (csrc/cuda/supcon_sm90.cuh), explored
over every interleaving: the producer warp and its TMA copies, the "full" and "empty"
mbarriers of the stages, and the two consumer warpgroups taking turns on two named barriers
(``PingPong``), in the forward's loop and in the backward's (a tile's S product issued with the
previous tile's dX product), and in the TF32 backward's, where the producer warpgroup's other
three warps (the transposers, one agent) write each landed tile's Y^T into its stage and
arrive on the stage's "yt_full" mbarrier, which a consumer waits on before its dX product
reads that Y^T. Checked for every column-tile count up to 7: no deadlock; a consumer only ever
reads (issue, wait, per-logit work) the stage holding the tile it expects, with that tile's
column inputs (and Y^T); the transposers only read a landed tile; every named-barrier
generation is one warpgroup's wait and the other's arrival; nothing is left pending at the end
(no copy in flight, no dangling arrival).

The model follows the kernels' code step by step; a warpgroup's four warps are one agent (they
arrive on "empty" together), as are the producer warp's 32 lanes ("full" counts them as one
arrival with the transaction bytes). mbarrier semantics: a wait on parity p passes once the
barrier's current phase differs from p (a fresh barrier is in phase 0); a phase completes when
its arrivals and transaction bytes are all in.
"""

from __future__ import annotations

import pytest

STAGES = 3          # kStages
EMPTY_ARRIVALS = 2  # kConsumerWarps, in units of a warpgroup's four warps
DONE = 99
MUTATION = None     # set by test_model_catches_broken_protocols only


def _start(n_tiles, transposed=False):
    return dict(prod=(0, 0), c0=(0, 0, 0), c1=(0, 0, 0), tr=(0 if transposed else DONE, 0),
                full=((0, 0, 0),) * STAGES,         # (phase, arrivals, transactions pending)
                empty=((0, 0),) * STAGES,           # (phase, arrivals)
                yt_full=(0,) * STAGES,              # phase (one arrival: the transposers)
                named=((0, ()), (0, ())),           # (generation, arrivals so far)
                stage=(-1,) * STAGES, cols=(-1,) * STAGES, yt=(-1,) * STAGES,
                tma=frozenset(), n=n_tiles, transposed=transposed)


def _key(s):
    return tuple(sorted(s.items()))


def _set(tup, i, v):
    return tup[:i] + (v,) + tup[i + 1:]


class Violation(AssertionError):
    pass


def _check(cond, what):
    if not cond:
        raise Violation(what)


def _full_done(bar):
    phase, arrivals, tx = bar
    return (phase ^ 1, 0, 0) if arrivals == 1 and tx == 0 else bar


def _named_arrive(s, bar, who, kind):
    gen, arrivals = s["named"][bar]
    arrivals += ((who, kind),)
    if len(arrivals) == 2:  # 256 threads: the generation completes
        _check(sorted(arrivals) == sorted([(bar, "sync"), (bar ^ 1, "arrive")]),
               f"named barrier {bar} completed by {arrivals}")
        gen, arrivals = gen + 1, ()
    s["named"] = _set(s["named"], bar, (gen, arrivals))
    return gen


def _release(s, stage):
    """A warpgroup's four warps arrive on the stage's "empty" barrier."""
    phase, arrivals = s["empty"][stage]
    s["empty"] = _set(s["empty"], stage,
                      (phase ^ 1, 0) if arrivals + 1 == EMPTY_ARRIVALS else (phase, arrivals + 1))


def _loop_head(s, agent, passes):
    """Step 0 of an agent's tile loop: done after the last tile, else on to step 1 once its wait
    passes."""
    t = s[agent][1]
    if t == s["n"]:
        s[agent] = (DONE, t)
    elif passes:
        s[agent] = (1, t)
    else:
        return None
    return s


def _producer(s):
    pc, t = s["prod"]
    st = t % STAGES
    if pc == 0:  # Barrier::wait(empty, ...)
        parity = ((t // STAGES) & 1) ^ (MUTATION != "empty parity")
        return _loop_head(s, "prod", s["empty"][st][0] != parity)
    if pc == 1:  # column inputs staged, arrive_and_expect_tx, the TMA copy issued
        s["cols"] = _set(s["cols"], st, t)
        phase, arrivals, tx = s["full"][st]
        s["full"] = _set(s["full"], st, _full_done((phase, arrivals + 1, tx + 1)))
        s["tma"] = s["tma"] | {(t, st)}
        s["prod"] = (0, t + 1)
    else:
        return None
    return s


def _transposers(s):
    """sm90::transpose: wait for tile t to land, write its Y^T, arrive on yt_full."""
    pc, t = s["tr"]
    st = t % STAGES
    if pc == 0:  # TxBarrier::wait(full, ...)
        return _loop_head(s, "tr", s["full"][st][0] != (t // STAGES) & 1)
    if pc == 1:  # reads the landed tile, writes its Y^T
        _check(s["stage"][st] == t,
               f"transposers read tile {t} from stage {st}, which holds {s['stage'][st]}")
        s["yt"] = _set(s["yt"], st, t)
        s["tr"] = (2, t)
    elif pc == 2:  # fence, then the arrival
        s["yt_full"] = _set(s["yt_full"], st, s["yt_full"][st] ^ 1)
        s["tr"] = (0, t + 1)
    else:
        return None
    return s


def _consumer(s, w, backward):
    name = f"c{w}"
    pc, t, gen = s[name]
    n, st, prev = s["n"], t % STAGES, (t + STAGES - 1) % STAGES
    turns = n + 1 if backward else n
    reads = []  # (stage, tile) pairs this step reads
    if pc == 0:  # PingPong::start
        if w == 1 and turns > 0 and MUTATION != "no first turn":
            _named_arrive(s, 0, 1, "arrive")
        s[name] = (1, 0, 0)
        return s
    if pc == 1:
        if t == n and not backward:
            s[name] = (DONE, t, 0)
            return s
        if t < n and s["full"][st][0] == (t // STAGES) & 1:
            return None  # TxBarrier::wait(full, ...)
        s[name] = (2, t, 0)
    elif pc == 2:  # PingPong::wait_turn: this warpgroup's arrival
        s[name] = (3, t, s["named"][w][0])
        _named_arrive(s, w, w, "sync")
    elif pc == 3:  # ... and its wait for the generation to complete
        if s["named"][w][0] == gen:
            return None
        s[name] = (4, t, 0)
    elif pc in (4, 6):  # the products issued, then waited for: both read their stages
        if (pc == 4 and s["transposed"] and t > 0 and MUTATION != "no yt wait"
                and s["yt_full"][prev] == ((t - 1) // STAGES) & 1):
            return None  # Barrier::wait(yt_full[prev], ...) before the dX product
        reads = ([(st, t)] if t < n else []) + ([(prev, t - 1)] if backward and t > 0 else [])
        if s["transposed"] and t > 0:
            _check(s["yt"][prev] == t - 1, f"consumer {w} reads Y^T of tile {t - 1} from stage "
                                            f"{prev}, which holds {s['yt'][prev]}")
        if pc == 4 and MUTATION == "release at issue" and not backward:
            _release(s, st)
        s[name] = (pc + 1, t, 0)
    elif pc == 5:  # PingPong::pass_turn
        if w == 0 or t + 1 < turns or MUTATION == "last turn passed":
            _named_arrive(s, w ^ 1, w, "arrive")
        s[name] = (6, t, 0)
    elif pc == 7:  # the forward's per-logit work, or the backward's release of the previous stage
        if not backward:
            reads = [(st, t)]
            if MUTATION != "release at issue":
                _release(s, st)
            s[name] = (1, t + 1, 0)
        else:
            if t > 0:
                _release(s, prev)
            s[name] = (8, t, 0)
    elif pc == 8:  # the backward's H(t) from this tile's column inputs
        if t == n:
            s[name] = (DONE, t, 0)
            return s
        reads = [(st, t)]
        s[name] = (1, t + 1, 0)
    else:
        return None
    for stage, tile in reads:
        _check(s["stage"][stage] == tile and s["cols"][stage] == tile,
               f"consumer {w} reads tile {tile} from stage {stage}, which holds "
               f"{s['stage'][stage]} (column inputs {s['cols'][stage]})")
    return s


def _tma_lands(s, copy):
    t, st = copy
    s["tma"] = s["tma"] - {copy}
    s["stage"] = _set(s["stage"], st, t)
    phase, arrivals, tx = s["full"][st]
    s["full"] = _set(s["full"], st, _full_done((phase, arrivals, tx - 1)))
    return s


def explore(n_tiles, backward, transposed=False):
    """Every reachable state; raises Violation on a broken property. Returns the state count.
    transposed: the TF32 backward's transposers take part (backward only)."""
    start = _start(n_tiles, transposed)
    seen, frontier = {_key(start)}, [start]
    while frontier:
        state = frontier.pop()
        moves = [lambda s: _producer(s), lambda s: _consumer(s, 0, backward),
                 lambda s: _consumer(s, 1, backward), lambda s: _transposers(s)]
        moves += [lambda s, c=c: _tma_lands(s, c) for c in state["tma"]]
        successors = [m(dict(state)) for m in moves]
        successors = [s for s in successors if s is not None]
        if not successors:
            done = all(state[a][0] == DONE for a in ("prod", "c0", "c1", "tr"))
            _check(done, f"deadlock: {state}")
            _check(not state["tma"] and all(not a for _, a in state["named"]),
                   f"left pending at the end: {state}")
        for s in successors:
            k = _key(s)
            if k not in seen:
                seen.add(k)
                frontier.append(s)
    return len(seen)


@pytest.mark.parametrize("backward,transposed", [(False, False), (True, False), (True, True)],
                         ids=["forward", "backward", "backward-tf32"])
@pytest.mark.parametrize("n_tiles", range(1, 8))
def test_pipeline_has_no_deadlock_and_no_stale_read(n_tiles, backward, transposed):
    assert explore(n_tiles, backward, transposed) > n_tiles


@pytest.mark.parametrize("mutation,backward,transposed,message", [
    ("empty parity", False, False, "deadlock"),          # round 0 waits for a release that never comes
    ("no first turn", True, False, "deadlock"),          # nobody lets warpgroup 0 go first
    ("last turn passed", False, False, "left pending"),  # an arrival nobody waits for
    ("release at issue", False, False, "reads tile"),    # the producer refills a stage being read
    ("no yt wait", True, True, "reads Y\\^T"),            # dX reads a Y^T not yet written
])
def test_model_catches_broken_protocols(monkeypatch, mutation, backward, transposed, message):
    """The model can fail: each of these changes to the protocol is caught."""
    monkeypatch.setattr(__import__(__name__, fromlist=["_"]), "MUTATION", mutation)
    with pytest.raises(Violation, match=message):
        for n_tiles in range(1, 6):
            explore(n_tiles, backward, transposed)
