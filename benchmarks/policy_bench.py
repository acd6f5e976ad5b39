"""Policy engine benchmark: bastion against oso 0.27.3 and cedarpy on one gitclub-style workload.

    make bench            (or: python benchmarks/policy_bench.py --sizes 1000 100000 1000000)

For each size (number of facts) it loads the same organizations, repositories, roles and parent
relations into bastion (facts), oso (facts as Polar ground rules) and cedarpy (a pre-parsed
policy set and entity store), then prints the median time per call of:

- authorize with a role held directly on the repository,
- authorize with a role inherited through the repository's parent organization,
- a full-search deny (a user with roles elsewhere, asking for something nothing grants),
- list: the repositories a user may read (1,000 of them at every size),
- actions: every action a user may take on one repository,

and the ratio of each peer to bastion. It also prints bastion's memory per fact (growth of the
process's resident memory while loading). It prints figures only; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion import Authorizer, Entity  # noqa: E402

POLICY = Path(__file__).resolve().parents[1] / "examples" / "gitclub.polar"
LISTED = 1000  # repositories in the organization whose list we time


# -- the workload ------------------------------------------------------------------------------


class Workload:
    """Deterministic facts: ``size`` of them, plus the probes every engine is asked about."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self.size = size
        rng = random.Random(seed)
        self.orgs = max(4, size // 1000)
        self.repos = max(LISTED + 10, size // 2)
        self.users = max(20, size // 10)
        self.org_roles: list[tuple[str, str, str]] = []  # (user, role, org)
        self.repo_roles: list[tuple[str, str, str]] = []  # (user, role, repo)
        self.parents: list[tuple[str, str]] = []  # (repo, org)
        # Organization o0 holds the first LISTED repositories; the rest are spread out.
        for r in range(self.repos):
            org = 0 if r < LISTED else 1 + r % (self.orgs - 1)
            self.parents.append((f"r{r}", f"o{org}"))
        budget = max(0, size - len(self.parents) - 4)
        seen = set()
        while len(self.org_roles) + len(self.repo_roles) < budget:
            user = f"u{rng.randrange(self.users)}"
            if rng.random() < 0.7:
                key = (
                    user,
                    rng.choice(["member", "member", "admin"]),
                    f"o{1 + rng.randrange(self.orgs - 1)}",
                )
                if key not in seen:
                    seen.add(key)
                    self.org_roles.append(key)
            else:
                key = (
                    user,
                    rng.choice(["reader", "maintainer", "admin"]),
                    f"r{rng.randrange(LISTED, self.repos)}",
                )
                if key not in seen:
                    seen.add(key)
                    self.repo_roles.append(key)
        # The probes.
        self.repo_roles.append(("direct", "maintainer", "r5"))
        self.org_roles.append(("inherit", "member", "o0"))
        self.org_roles.append(("nobody", "member", "o1"))
        self.repo_roles.append(("nobody", "reader", f"r{LISTED + 1}"))

    @property
    def count(self) -> int:
        return len(self.org_roles) + len(self.repo_roles) + len(self.parents)


# -- engines -----------------------------------------------------------------------------------


class Bastion:
    name = "bastion"

    def __init__(self, w: Workload) -> None:
        User, Org, Repo = (
            (lambda i: Entity("User", i)),
            (lambda i: Entity("Organization", i)),
            (lambda i: Entity("Repository", i)),
        )  # noqa: E731
        self.authz = Authorizer.from_files(POLICY)
        facts = itertools.chain(
            (("has_role", User(u), role, Org(o)) for u, role, o in w.org_roles),
            (("has_role", User(u), role, Repo(r)) for u, role, r in w.repo_roles),
            (("has_relation", Repo(r), "parent", Org(o)) for r, o in w.parents),
        )
        while chunk := list(itertools.islice(facts, 50_000)):
            self.authz.facts.apply(chunk, [])
        self.User, self.Repo = User, Repo

    def authorize(self, user: str, action: str, repo: str):
        a, u, r = self.authz.authorize, self.User(user), self.Repo(repo)
        return lambda: a(u, action, r)

    def list(self, user: str, action: str):
        f, u = self.authz.list, self.User(user)
        return lambda: f(u, action, "Repository")

    def actions(self, user: str, repo: str):
        f, u, r = self.authz.actions, self.User(user), self.Repo(repo)
        return lambda: f(u, r)


OSO_POLICY = """
permission(u, "read", r) if repo_role(u, "reader", r);
permission(u, "create_issue", r) if repo_role(u, "reader", r);
permission(u, "push", r) if repo_role(u, "maintainer", r);
permission(u, "delete", r) if repo_role(u, "admin", r);
permission(_u, "read", r) if is_public(r);
repo_role(u, role, r) if role_fact(u, role, r);
repo_role(u, "reader", r) if rel_fact(r, "parent", o) and org_role(u, "member", o);
repo_role(u, "admin", r) if rel_fact(r, "parent", o) and org_role(u, "admin", o);
repo_role(u, "reader", r) if repo_role(u, "maintainer", r);
repo_role(u, "maintainer", r) if repo_role(u, "admin", r);
org_role(u, role, o) if role_fact(u, role, o);
org_role(u, "member", o) if org_role(u, "admin", o);
allow(u, action, r) if permission(u, action, r) and not is_blocked(u);
is_public("Repository:none");
is_blocked("User:none");
"""


class Oso:
    name = "oso"

    def __init__(self, w: Workload) -> None:
        import oso

        lines = [OSO_POLICY]
        lines += [
            f'role_fact("User:{u}", "{role}", "Organization:{o}");' for u, role, o in w.org_roles
        ]
        lines += [
            f'role_fact("User:{u}", "{role}", "Repository:{r}");' for u, role, r in w.repo_roles
        ]
        lines += [
            f'rel_fact("Repository:{r}", "parent", "Organization:{o}");' for r, o in w.parents
        ]
        self.oso = oso.Oso()
        self.oso.load_str("\n".join(lines))
        self.Variable = oso.Variable

    def authorize(self, user: str, action: str, repo: str):
        q, u, r = self.oso.query_rule_once, f"User:{user}", f"Repository:{repo}"
        return lambda: q("allow", u, action, r)

    def list(self, user: str, action: str):
        q, u, v = self.oso.query_rule, f"User:{user}", self.Variable("r")
        return lambda: {res["bindings"]["r"] for res in q("allow", u, action, v)}

    def actions(self, user: str, repo: str):
        q, u, r, v = self.oso.query_rule, f"User:{user}", f"Repository:{repo}", self.Variable("a")
        return lambda: {res["bindings"]["a"] for res in q("allow", u, v, r)}


CEDAR_POLICY = """
permit(principal, action == Action::"read", resource is Repository)
  when { principal in resource.readers || principal in resource.orgMembers || resource.public };
permit(principal, action == Action::"create_issue", resource is Repository)
  when { principal in resource.readers || principal in resource.orgMembers };
permit(principal, action == Action::"push", resource is Repository)
  when { principal in resource.maintainers || principal in resource.orgAdmins };
permit(principal, action == Action::"delete", resource is Repository)
  when { principal in resource.admins || principal in resource.orgAdmins };
forbid(principal, action, resource) when { principal has blocked && principal.blocked };
"""
ACTIONS = ["read", "create_issue", "push", "delete"]


class Cedar:
    """Roles as groups: a user's parents are role groups; admins are in maintainers are in readers."""

    name = "cedarpy"

    def __init__(self, w: Workload) -> None:
        import cedarpy

        def uid(t: str, i: str) -> dict:
            return {"type": t, "id": i}

        parents: dict[str, list] = {}
        for u, role, o in w.org_roles:
            group = "OrgAdmins" if role == "admin" else "OrgMembers"
            parents.setdefault(u, []).append(uid(group, o))
        for u, role, r in w.repo_roles:
            group = {
                "reader": "RepoReaders",
                "maintainer": "RepoMaintainers",
                "admin": "RepoAdmins",
            }[role]
            parents.setdefault(u, []).append(uid(group, r))
        entities = [{"uid": uid("User", u), "attrs": {}, "parents": p} for u, p in parents.items()]
        for o in range(w.orgs):
            entities.append(
                {
                    "uid": uid("OrgAdmins", f"o{o}"),
                    "attrs": {},
                    "parents": [uid("OrgMembers", f"o{o}")],
                }
            )
            entities.append({"uid": uid("OrgMembers", f"o{o}"), "attrs": {}, "parents": []})
        for r, o in w.parents:
            entities.append(
                {"uid": uid("RepoAdmins", r), "attrs": {}, "parents": [uid("RepoMaintainers", r)]}
            )
            entities.append(
                {"uid": uid("RepoMaintainers", r), "attrs": {}, "parents": [uid("RepoReaders", r)]}
            )
            entities.append({"uid": uid("RepoReaders", r), "attrs": {}, "parents": []})
            attrs = {
                "public": False,
                "readers": {"__entity": uid("RepoReaders", r)},
                "maintainers": {"__entity": uid("RepoMaintainers", r)},
                "admins": {"__entity": uid("RepoAdmins", r)},
                "orgMembers": {"__entity": uid("OrgMembers", o)},
                "orgAdmins": {"__entity": uid("OrgAdmins", o)},
            }
            entities.append({"uid": uid("Repository", r), "attrs": attrs, "parents": []})
        self.cedarpy = cedarpy
        self.policies = cedarpy.PolicySet.from_str(CEDAR_POLICY)
        self.entities = cedarpy.Entities.from_json_str(json.dumps(entities))
        self.repos = [r for r, _ in w.parents]

    def _request(self, user: str, action: str, repo: str) -> dict:
        return {
            "principal": f'User::"{user}"',
            "action": f'Action::"{action}"',
            "resource": f'Repository::"{repo}"',
            "context": {},
        }

    def authorize(self, user: str, action: str, repo: str):
        f, req, p, e = (
            self.cedarpy.is_authorized,
            self._request(user, action, repo),
            self.policies,
            self.entities,
        )
        allow = self.cedarpy.Decision.Allow
        return lambda: f(req, p, e).decision == allow

    def actions(self, user: str, repo: str):
        f, p, e = self.cedarpy.is_authorized_batch, self.policies, self.entities
        reqs = [self._request(user, a, repo) for a in ACTIONS]
        return lambda: {a for a, res in zip(ACTIONS, f(reqs, p, e), strict=True) if res.allowed}


# -- timing ------------------------------------------------------------------------------------


def median_us(fn, budget_s: float = 1.0, trials: int = 15) -> float:
    """Median time of one call in microseconds, over ``trials`` batches sized to the budget."""
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    if one > 2.0:
        return one * 1e6  # too slow to repeat: one call's time
    per_batch = max(1, int(budget_s / trials / one))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter_ns()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter_ns() - t0) / per_batch / 1000)
    return statistics.median(samples)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(size: int, peers: list[str], peer_limit: dict[str, int]) -> dict:
    w = Workload(size)
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    b = Bastion(w)
    load_s = time.perf_counter() - t0
    ops = {
        "authorize: direct role": lambda e: e.authorize("direct", "push", "r5"),
        "authorize: role via parent org": lambda e: e.authorize("inherit", "read", "r7"),
        "authorize: full-search deny": lambda e: e.authorize("nobody", "delete", "r9"),
        f"list: {LISTED} readable repos": lambda e: e.list("inherit", "read"),
        "actions on one repo": lambda e: e.actions("inherit", "r7"),
    }
    # Sanity: every engine must give the same answers, or its timing means nothing.
    expect = {"direct": True, "inherit": True, "nobody": False}
    assert b.authorize("direct", "push", "r5")() and b.authorize("inherit", "read", "r7")()
    assert not b.authorize("nobody", "delete", "r9")()
    assert len(b.list("inherit", "read")()) == LISTED
    results: dict[str, dict[str, float | None]] = {
        name: {"bastion": median_us(op(b))} for name, op in ops.items()
    }
    gc.collect()
    per_fact = (rss_bytes() - before) / w.count
    print(
        f"\n== {w.count:,} facts (bastion loaded in {load_s:.1f}s, {per_fact:.0f} bytes/fact of resident memory)"
    )
    del expect
    for peer in peers:
        if size > peer_limit.get(peer, 10**9):
            print(f"   {peer}: skipped at this size (--{peer}-max {peer_limit[peer]:,})")
            continue
        cls = {"oso": Oso, "cedarpy": Cedar}[peer]
        try:
            t0 = time.perf_counter()
            engine = cls(w)
            print(f"   {peer} loaded in {time.perf_counter() - t0:.1f}s")
        except ImportError:
            print(f"   {peer}: not installed (pip install -e '.[bench]')")
            continue
        if not (engine.authorize("direct", "push", "r5")() and engine.authorize("inherit", "read", "r7")()
                and not engine.authorize("nobody", "delete", "r9")()):  # fmt: skip
            print(f"   {peer}: gives different answers; not timed")
            continue
        for name, op in ops.items():
            kind = (
                "list"
                if name.startswith("list")
                else "actions"
                if name.startswith("actions")
                else "authorize"
            )
            if getattr(engine, kind, None) is None:
                results[name][peer] = None
                continue
            try:
                results[name][peer] = median_us(op(engine))
            except Exception as err:  # a peer's own limit (oso stops queries after 30 s)
                print(f"   {peer} {name}: {type(err).__name__}: {str(err).splitlines()[0]}")
                results[name][peer] = None
        del engine
        gc.collect()
    header = f"   {'operation':34} {'bastion':>12}" + "".join(
        f" {p:>12} {p + '/bastion':>16}" for p in peers
    )
    print(header)
    for name, row in results.items():
        line = f"   {name:34} {_fmt(row['bastion']):>12}"
        for p in peers:
            v = row.get(p)
            ratio = f"{v / row['bastion']:.1f}x" if v else "n/a"
            line += f" {_fmt(v):>12} {ratio:>16}"
        print(line)
    return {"facts": w.count, "bytes_per_fact": per_fact, "results": results}


def _fmt(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.2f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--peers", nargs="*", default=["oso", "cedarpy"])
    parser.add_argument(
        "--oso-max", type=int, default=100_000, help="largest size to load into oso"
    )
    parser.add_argument("--cedarpy-max", type=int, default=1_000_000)
    args = parser.parse_args()
    if len(args.sizes) > 1:
        # One process per size, so that memory freed by one size cannot hide the next one's.
        print(
            f"python {sys.version.split()[0]}; medians of 15 batches per figure; times are per call"
        )
        for size in args.sizes:
            sys.stdout.flush()
            subprocess.run([sys.executable, __file__, "--sizes", str(size), "--peers", *args.peers,
                            "--oso-max", str(args.oso_max), "--cedarpy-max", str(args.cedarpy_max)], check=True)  # fmt: skip
        return
    run(args.sizes[0], args.peers, {"oso": args.oso_max, "cedarpy": args.cedarpy_max})


if __name__ == "__main__":
    main()
