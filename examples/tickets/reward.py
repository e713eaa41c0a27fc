"""The verifier a support team would write for RFT on its unlabelled tickets: no gold label, only
the handbook. The prompt carries the retrieved policies ("<product> policy: Double charges, wrong
amounts and damaged deliveries: refunded|not refunded ... Escalation team: <team>.") and the ticket;
the decision must name the team of the ticket's product's policy, and refund exactly when that
policy refunds and the ticket is one of the refundable issues it lists.

    policy_followed(prompts, completions) -> [0, 1/3, 2/3, 1 per completion, or None]

A third each for: a JSON object with the four fields and their allowed values, the right team, the
right refund. None (not judged) when no retrieved policy names the ticket's product.
Allowed on a server started with `--reward-module examples` (examples/demo.sh does).
"""

from __future__ import annotations

import re

from stillroom.actors.algo.rewards import parse_json_object

_POLICY = re.compile(
    r"([A-Z][a-z]+ [a-z]+) policy: Double charges, wrong amounts and damaged deliveries: "
    r"(not )?refunded"
)
_TEAM = re.compile(r"Escalation team: (\w+)")
# the refundable issues the policies name, as tickets word them
_REFUNDABLE = ("charged twice", "wrong amount", "arrived damaged")
ALLOWED = {
    "category": {"billing", "shipping", "technical", "account"},
    "priority": {"low", "medium", "high"},
    "refund": {True, False},
}


def policies(prompt: str) -> dict[str, tuple[bool, str]]:
    """Product -> (refunds, team) of each policy the prompt carries."""
    found = {}
    for m in _POLICY.finditer(prompt):
        team = _TEAM.search(prompt, m.end())
        if team:
            found[m.group(1).lower()] = (m.group(2) is None, team.group(1))
    return found


def expected(prompt: str) -> tuple[bool, str] | None:
    """(refund, team) the ticket's product's policy asks for, or None when no policy names it."""
    ticket = ticket_of(prompt)
    for product, (refunds, team) in policies(prompt).items():
        if product in ticket:
            return refunds and any(k in ticket for k in _REFUNDABLE), team
    return None


def well_formed(decision: dict) -> bool:
    """The four fields, each with an allowed value (team: any word)."""
    return all(decision.get(k) in v for k, v in ALLOWED.items()) and isinstance(decision.get("team"), str)


def judged(prompts: list[str], completions: list[str], want_of, checks) -> list[float | None]:
    """What both verifiers share: per completion, the fraction of checks(decision, want) that hold;
    0 when the answer is no JSON object; None when want_of(prompt) is None (not judged)."""
    out: list[float | None] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        want, decision = want_of(prompt), parse_json_object(completion)
        if want is None:
            out.append(None)
        elif decision is None:
            out.append(0.0)
        else:
            results = checks(decision, want)
            out.append(sum(results) / len(results))
    return out


def ticket_of(prompt: str) -> str:
    """The ticket's own words (after the last "Ticket:"), lower-cased."""
    return prompt.rsplit("Ticket:", 1)[-1].lower()


def policy_followed(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Per completion, the fraction of (well formed, team right, refund right); None when the
    prompt's policies do not name the ticket's product."""

    def checks(decision: dict, want: tuple[bool, str]) -> tuple[bool, ...]:
        refund, team = want
        return well_formed(decision), decision.get("team") == team, decision.get("refund") is refund

    return judged(prompts, completions, expected, checks)


# The team's triage guide, as a reviewer applies it to the ticket's own words (no label needed):
# what each kind of request is filed under, and how urgent it is.
TRIAGE = {  # phrase in the ticket -> (category, the priority the request itself carries)
    "charged twice": ("billing", "high"),
    "wrong amount": ("billing", "medium"),
    "copy of the receipt": ("billing", "low"),
    "card was declined": ("billing", "medium"),
    "has not arrived": ("shipping", "medium"),
    "arrived damaged": ("shipping", "medium"),
    "delivery address": ("shipping", "medium"),
    "stopped working": ("technical", "medium"),
    "keeps disconnecting": ("technical", "medium"),
    "update the firmware": ("technical", "low"),
    "cannot log in": ("account", "high"),
    "delete the account": ("account", "medium"),
    "change the email": ("account", "low"),
}
URGENT = ("urgent", "fixed today", "team is blocked", "asap", "enterprise plan")  # always high
CALM = ("no rush", "whenever you have time", "quick question")  # low, unless urgent or a high request


def triage(prompt: str) -> tuple[str, str] | None:
    """(category, priority) the triage guide gives the prompt's ticket; None for a request it does
    not list."""
    ticket = ticket_of(prompt)
    found = next((v for phrase, v in TRIAGE.items() if phrase in ticket), None)
    if found is None:
        return None
    category, priority = found
    if any(w in ticket for w in URGENT):
        priority = "high"
    elif priority != "high" and any(w in ticket for w in CALM):
        priority = "low"
    return category, priority


def triage_followed(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Per completion, half for the category and half for the priority the triage guide gives the
    ticket; 0 when the answer is no JSON object; None when the guide does not list the request."""

    def checks(decision: dict, want: tuple[str, str]) -> tuple[bool, ...]:
        return decision.get("category") == want[0], decision.get("priority") == want[1]

    return judged(prompts, completions, triage, checks)
