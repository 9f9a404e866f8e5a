"""paper.md from paper.json (benchmarks/gpu/paper.py): the table of `python -m pretrain.evaluate table`
over the scored runs, then one line per run: steps reached, seed, time box, training and scoring time."""
from pretrain.evaluate.table import HEADLINE, render
from pretrain.evaluate.tasks import BUILTIN_TEST_EXAMPLES


def table_rows(arms: list[dict]) -> list[dict]:
    """The scored runs as rows of pretrain.evaluate.table.render (wall time: the run's training)."""
    return [{"label": arm["label"], "seed": arm["seed"], "params": arm["params"], "tokens": arm["tokens"],
             "wall_s": arm["train_s"], "results": arm["results"], "kinds": arm["kinds"]}
            for arm in arms if arm["status"] == "ok"]


def _headline(arm: dict) -> str:
    if arm.get("status") != "ok":
        return ""
    kind = arm["kinds"][arm["task"]]
    return f"{HEADLINE[kind]} {arm['results'][arm['task']][HEADLINE[kind]]:.3f}"


def render_markdown(report: dict) -> str:
    arms = report["arms"]
    # the most common count, then the arms that have their own
    common = max(set(report["steps"].values()), key=list(report["steps"].values()).count)
    own = [f"{arm} {n}" for arm, n in report["steps"].items() if n != common]
    targets = f"{common}{' (' + ', '.join(own) + ')' if own else ''}"
    stopped = [arm for arm in arms if arm.get("stopped_by")]
    lines = [f"# The paper's comparison{' (dry run, CPU: numbers meaningless)' if report['dry_run'] else ''}", "",
             f"{report['date_utc']} · {report['device']} · torch {report['torch']} · "
             f"commit {report['git_commit']} · lanes {report['lanes']} · "
             f"{report['total_seconds']} s of a {report['budget_s']:.0f} s budget · {report['kernels']}", "",
             f"Target: {targets} steps of batch {report['batch']} per run; runs stopped by their time box: "
             f"{len(stopped)} of {len(arms)}; "
             f"test examples per task: {report['test_limit'] or BUILTIN_TEST_EXAMPLES}; data drawn in "
             f"{max(report.get('data_s', {'-': 0}).values())} s.", ""]
    rows = table_rows(arms)
    lines += [render(rows) if rows else "(no run scored)", "",
              "| run | seed | status | steps | stopped by | box s | train s | score s | test |",
              "|---|---:|---|---:|---|---:|---:|---:|---|"]
    for arm in arms:
        reached = f"{arm['steps']} / {arm['steps_target']}" if arm.get("steps") is not None else "-"
        lines.append(f"| {arm['arm']} | {arm['seed']} | {arm['status']} | {reached} | {arm.get('stopped_by') or ''} | "
                     f"{arm['box_s']} | {arm.get('train_s', '')} | {arm.get('score_s', '')} | "
                     f"{_headline(arm) or arm.get('error', '')} |")
    return "\n".join(lines) + "\n"
