"""Statistics of pairwise ratings: win rates with Wilson 95% confidence intervals per pair of systems, and
Bradley-Terry strengths (on an Elo-like scale) when more than two systems were compared."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def bradley_terry(outcomes: Iterable[tuple[str, str, str | None]], prior: float = 0.5,
                  iterations: int = 10_000) -> dict[str, float]:
    """Bradley-Terry strengths from (system_1, system_2, winner or None for a tie) by Hunter's MM algorithm; a tie
    counts half a win for each side, and `prior` virtual ties per compared pair keep undefeated systems finite.
    Returned on an Elo-like scale: 1000 + 400 · log10(strength / geometric mean)."""
    games: dict[tuple[str, str], float] = defaultdict(float)
    wins: dict[str, float] = defaultdict(float)
    for s1, s2, winner in outcomes:
        games[tuple(sorted((s1, s2)))] += 1
        if winner is None:
            wins[s1] += 0.5
            wins[s2] += 0.5
        else:
            wins[winner] += 1.0
    for s1, s2 in list(games):
        games[(s1, s2)] += prior
        wins[s1] += prior / 2
        wins[s2] += prior / 2
    systems = sorted(wins)
    strength = {s: 1.0 for s in systems}
    for _ in range(iterations):
        new = {}
        for s in systems:
            denom = sum(n / (strength[a] + strength[b]) for (a, b), n in games.items() if s in (a, b))
            new[s] = wins[s] / denom
        log_mean = sum(math.log(v) for v in new.values()) / len(new)
        new = {s: v / math.exp(log_mean) for s, v in new.items()}
        change = max(abs(new[s] - strength[s]) for s in systems)
        strength = new
        if change < 1e-12:
            break
    return {s: 1000.0 + 400.0 * math.log10(v) for s, v in strength.items()}


def _tally() -> dict:
    return {"ratings": 0, "wins": 0, "losses": 0, "ties": 0}


def summarize(outcomes: list[tuple[str, str, str | None]]) -> dict:
    """Per unordered pair of systems (the alphabetically first is `system`, the other `opponent`): ratings, wins,
    losses, ties, and the win rate (a tie counts half) with its Wilson 95% interval; per system: wins, losses,
    ties and, with more than two systems, a Bradley-Terry score (`bt_elo`), best first."""
    pairs: dict[tuple[str, str], dict] = {}
    systems: dict[str, dict] = {}
    for s1, s2, winner in outcomes:
        a, b = sorted((s1, s2))
        tallies = [(a, pairs.setdefault((a, b), {"system": a, "opponent": b, **_tally()}))]
        tallies += [(s, systems.setdefault(s, {"system": s, **_tally()})) for s in (a, b)]
        for s, tally in tallies:
            tally["ratings"] += 1
            tally["ties" if winner is None else ("wins" if winner == s else "losses")] += 1
    for row in pairs.values():
        score = row["wins"] + 0.5 * row["ties"]
        row["win_rate"] = score / row["ratings"]
        row["ci_low"], row["ci_high"] = wilson_interval(score, row["ratings"])
    if len(systems) > 2:
        for s, elo in bradley_terry(outcomes).items():
            systems[s]["bt_elo"] = elo
    ranked = sorted(systems.values(), key=lambda r: (-r.get("bt_elo", 0.0), r["system"]))
    return {"ratings": len(outcomes), "pairs": [pairs[k] for k in sorted(pairs)], "systems": ranked}


PAIR_HEADERS = ["system", "opponent", "ratings", "wins", "losses", "ties", "win rate", "95% CI"]
SYSTEM_HEADERS = ["system", "Bradley-Terry (Elo scale)", "wins", "losses", "ties"]


def report_tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    """The summary as (headers, rows of cells) tables: pairs, and systems when Bradley-Terry scores exist."""
    tables = [(PAIR_HEADERS, [[r["system"], r["opponent"], str(r["ratings"]), str(r["wins"]), str(r["losses"]),
                               str(r["ties"]), f"{r['win_rate']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"]
                              for r in summary["pairs"]])]
    if any("bt_elo" in s for s in summary["systems"]):
        tables.append((SYSTEM_HEADERS, [[s["system"], f"{s['bt_elo']:.0f}", str(s["wins"]), str(s["losses"]),
                                         str(s["ties"])] for s in summary["systems"]]))
    return tables


NOTE = "The win rate is the system's against its opponent, a tie counting half; the interval is Wilson's."


def format_report(summary: dict, raters: int) -> str:
    """The summary as text with markdown tables."""
    lines = [f"{summary['ratings']} rating(s) by {raters} rater(s)"]
    if summary["pairs"]:
        for headers, rows in report_tables(summary):
            lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines += ["", NOTE]
    return "\n".join(lines) + "\n"
