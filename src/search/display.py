"""A study on the terminal: the live view of a running one (recent trials and a progress bar) and the
summary of its best trial with parameter importances (rich)."""
from __future__ import annotations

from typing import Any

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from src.search.outputs import trial_counts

FINISHED = ("COMPLETE", "PRUNED")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_table(trials: list, rows: int = 12) -> Table:
    table = Table(title="trials (latest first)", title_justify="left", expand=False)
    for column in ("#", "state", "cv spearman", "best so far", "params"):
        table.add_column(column, justify="right" if column != "params" else "left")
    best = None
    best_by_number = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name == "COMPLETE" and t.value is not None and (best is None or t.value > best):
            best = t.value
        best_by_number[t.number] = best
    for t in sorted(trials, key=lambda t: t.number, reverse=True)[:rows]:
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in t.params.items())
        value = f"{t.value:.4f}" if t.state.name == "COMPLETE" and t.value is not None else "-"
        best_text = f"{best_by_number[t.number]:.4f}" if best_by_number[t.number] is not None else "-"
        table.add_row(str(t.number), t.state.name.lower(), value, best_text, params)
    return table


class StudyMonitor:
    """Optuna callback that redraws the table and the finished/target bar after each trial. Where the
    output is not a terminal (a worker's log file), it writes one line per trial that ends here and
    the table once at the end."""

    def __init__(self, target: int, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(TextColumn("finished trials"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        self.task = self.progress.add_task("trials", total=target)
        self.live = Live(console=self.console, refresh_per_second=2, transient=False)
        self.last_table = Table()
        self.lines = not self.console.is_terminal

    def _render(self, trials: list) -> Group:
        done = sum(t.state.name in FINISHED for t in trials)
        self.progress.update(self.task, completed=done)
        self.last_table = trial_table(trials)
        return Group(self.last_table, self.progress)

    def __enter__(self) -> "StudyMonitor":
        if not self.lines:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.lines:
            self.console.print(Group(self.last_table, self.progress))
        else:
            self.live.__exit__(*exc)

    def show(self, study) -> list:
        trials = study.get_trials(deepcopy=False)
        rendered = self._render(trials)
        if not self.lines:
            self.live.update(rendered)
        return trials

    def __call__(self, study, trial) -> None:
        trials = self.show(study)
        if self.lines:
            self.console.print(self._line(trial, trials), soft_wrap=True)

    def _line(self, trial, trials: list) -> str:
        if trial.state.name == "COMPLETE":
            outcome = f" {trial.value:.4f}"
        elif trial.state.name == "PRUNED":  # its value is a running score, not comparable to the best
            outcome = f" after {trial.user_attrs.get('epochs_run', '?')} epochs"
        else:
            outcome = f" ({trial.user_attrs.get('fail_reason', 'interrupted')})"
        best = max((t.value for t in trials if t.state.name == "COMPLETE"), default=None)
        task = self.progress.tasks[0]
        return (f"trial {trial.number} {trial.state.name.lower()}{outcome} | best "
                f"{'-' if best is None else f'{best:.4f}'} | {task.completed}/{task.total} finished")


def print_summary(study: optuna.Study, console=None) -> None:
    console = console or Console()
    counts = trial_counts(study)
    if counts["complete"] == 0:
        console.print(f"study {study.study_name}: no complete trial ({counts})")
        return
    best = study.best_trial
    table = Table(title=f"best trial #{best.number}: cv spearman {best.value:.4f} "
                        f"(floor {best.user_attrs.get('floor_spearman', float('nan')):.4f})",
                  title_justify="left")
    table.add_column("param")
    table.add_column("value", justify="right")
    table.add_column("importance", justify="right")
    try:
        importances = optuna.importance.get_param_importances(study) if counts["complete"] >= 2 else {}
    except (RuntimeError, ValueError):  # too few distinct trials for an importance estimate
        importances = {}
    for name, value in best.params.items():
        imp = importances.get(name)
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value),
                      f"{imp:.3f}" if imp is not None else "-")
    console.print(table)
    console.print(f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed")


