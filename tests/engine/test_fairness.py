"""Fair share: users of one plan take turns; plans share the GPU by weight; caps hold."""

from __future__ import annotations

from collections import Counter

from .conftest import job_ids, req, run_all


def test_one_users_twenty_jobs_do_not_starve_anothers_one(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    a_jobs = [req("alice") for _ in range(20)]
    for r in a_jobs:
        engine.add_request(r)
    engine.step()  # alice's first job starts
    first = executor.only()
    bob = req("bob")
    engine.add_request(bob)
    executor.complete(first.batch_id)
    order = [first] + run_all(engine, executor, clock)
    ran = [job_ids(b)[0] for b in order]
    assert ran.index(bob.job_id) <= 2  # behind the running one and at most one more of alice's
    assert sorted(ran) == sorted([r.job_id for r in a_jobs] + [bob.job_id])


def test_users_alternate_within_a_plan(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    owner = {}
    for user in ("alice", "alice", "alice", "bob", "bob", "bob"):
        r = req(user)
        owner[r.job_id] = user
        engine.add_request(r)
    users = [owner[job_ids(b)[0]] for b in run_all(engine, executor, clock)]
    assert users == ["alice", "bob"] * 3


def test_weights_give_each_backlogged_plan_its_share(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    plan_of = {}
    for plan in ("free", "plus", "enterprise"):
        for user in range(3):
            for _ in range(200):
                r = req(f"{plan}-{user}", plan)
                plan_of[r.job_id] = plan
                engine.add_request(r)
    served: Counter[str] = Counter()
    for _ in range(260):  # well before any plan runs dry
        engine.step()
        batch = executor.only()
        served[plan_of[job_ids(batch)[0]]] += 1
        executor.complete(batch.batch_id)
    share = {plan: served[plan] / 260 for plan in served}
    assert abs(share["free"] - 1 / 13) < 0.02
    assert abs(share["plus"] - 4 / 13) < 0.02
    assert abs(share["enterprise"] - 8 / 13) < 0.02


def test_weight_changes_live(make_engine, executor, clock):
    engine = make_engine(max_batch_images=1)
    plan_of = {}
    for plan in ("free", "plus"):
        for _ in range(300):
            r = req(plan, plan)
            plan_of[r.job_id] = plan
            engine.add_request(r)
    engine.update_plan("plus", weight=1)
    served: Counter[str] = Counter()
    for _ in range(100):
        engine.step()
        batch = executor.only()
        served[plan_of[job_ids(batch)[0]]] += 1
        executor.complete(batch.batch_id)
    assert abs(served["free"] - served["plus"]) <= 2


def test_plan_running_cap_leaves_room_for_others(make_engine, executor, clock):
    executor.slots = 3
    engine = make_engine(max_batch_images=1, plan_max_running_images={"free": 1})
    frees = [req(f"f{i}", "free") for i in range(4)]
    for r in frees:
        engine.add_request(r)
    engine.step()
    assert len(executor.running) == 1  # the cap, although three workers are idle
    plus = req("p", "plus")
    engine.add_request(plus)
    engine.step()
    running = {job_ids(b)[0] for b in executor.running.values()}
    assert plus.job_id in running and len(running) == 2
