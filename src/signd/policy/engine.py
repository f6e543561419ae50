"""The policy decision: deny by default, first granting rule wins, spend counted per window.

A request is allowed only if some rule covers it (client, key labels, operation, chain) and
every constraint of that rule holds, including its spend window. Rules are tried in file
order; the first that allows is the one named in the decision and charged for the value. If
none allows, the refusal names each covering rule and why it refused, or says that no rule
covers the request.

Spending is recorded by :meth:`PolicyEngine.commit`, called only once the signature exists,
so a signing failure does not use up allowance. ``commit`` re-checks the window under the
lock, so two requests checked at the same time cannot together exceed it: the second commit
is refused and its signature must be discarded::

    decision = engine.check(intent)
    decision.raise_if_refused()
    signature = sign(...)
    spend = engine.commit(decision, intent)   # AccessDenied: drop the signature
    audit(..., spend=spend)                   # the spend goes into the audit record

Windows live in memory. After a restart they are rebuilt from the audit log's tail with
:meth:`PolicyEngine.replay`, each spend at its record's own time. Until the whole tail over
:attr:`PolicyEngine.longest_window` has been replayed (:meth:`PolicyEngine.await_replay`
says it has not), a request that would count against a window raises
:class:`SpendWindowsUnavailable` rather than be checked against windows that may be short.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from signd.audit.records import Spend
from signd.errors import AccessDenied, DependencyUnavailable
from signd.policy.intent import SigningIntent
from signd.policy.model import Policy, Rule


class SpendWindowsUnavailable(DependencyUnavailable):
    """A request under a rule with a spend window, while the windows are not yet rebuilt
    from the audit log (503: retry once the log's tail has been replayed)."""

    code = "spend_windows_unavailable"


class PolicySource(Protocol):
    """Anything that gives the policy in force (a :class:`PolicyHolder` does)."""

    @property
    def current(self) -> Policy: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one intent.

    ``rule`` is the rule that allowed it, or the first covering rule that refused it
    (``None`` when no rule covers the request); ``reason`` says why in words.
    """

    allowed: bool
    rule: str | None
    reason: str
    policy_sha256: str
    intent: SigningIntent = field(repr=False)

    @property
    def refused(self) -> bool:
        return not self.allowed

    def raise_if_refused(self) -> None:
        """Raise :class:`~signd.errors.AccessDenied` with the refusal's reason."""
        if not self.allowed:
            raise AccessDenied(self.reason)


class SpendLedger:
    """Wei committed per (rule name, key id) with its time, pruned as windows slide.

    An entry at time ``t`` counts while ``now - t < window``. Entries stamped after ``now``
    (the clock stepped back) keep counting, which errs on the side of refusing. Not locked
    by itself; :class:`PolicyEngine` serialises access.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], deque[tuple[float, int]]] = {}

    def spent(self, rule: str, key_id: str, *, window: int, now: float) -> int:
        entries = self._entries.get((rule, key_id))
        if not entries:
            return 0
        horizon = now - window
        while entries and entries[0][0] <= horizon:
            entries.popleft()
        if not entries:
            del self._entries[(rule, key_id)]
            return 0
        return sum(value for at, value in entries if at > horizon)

    def record(self, rule: str, key_id: str, value: int, *, now: float) -> None:
        entries = self._entries.setdefault((rule, key_id), deque())
        entries.append((now, value))
        if len(entries) > 1 and entries[-2][0] > now:  # replayed out of order
            self._entries[(rule, key_id)] = deque(sorted(entries))


class PolicyEngine:
    """Evaluates intents against the policy in force; thread-safe.

    ``policy`` is a :class:`Policy` or a holder whose ``current`` policy is read on each
    call; spending is kept across reloads (per rule name), so reloading the same file does
    not reset the windows. ``now`` is the clock in seconds, injectable for tests.
    """

    def __init__(
        self, policy: Policy | PolicySource, *, now: Callable[[], float] = time.time
    ) -> None:
        self._source = policy
        self._now = now
        self._ledger = SpendLedger()
        self._lock = threading.Lock()
        self._unreplayed: str | None = None

    def __repr__(self) -> str:
        return f"PolicyEngine(policy={self.policy!r})"

    @property
    def policy(self) -> Policy:
        source = self._source
        return source if isinstance(source, Policy) else source.current

    @property
    def longest_window(self) -> int:
        """The longest spend window of the policy in force, in seconds (0: none)."""
        return longest_window(self.policy)

    @property
    def windows_ready(self) -> bool:
        """Whether the windows hold every spend they should (see :meth:`await_replay`)."""
        return self._unreplayed is None

    def await_replay(self, why: str) -> None:
        """Mark the windows incomplete: until :meth:`replay` is called with ``complete``,
        requests that would count against a window raise :class:`SpendWindowsUnavailable`
        (saying ``why``)."""
        with self._lock:
            self._unreplayed = why

    def replay(self, spends: Iterable[tuple[float, Spend]], *, complete: bool = True) -> None:
        """Put spends read back from the audit log into the windows, each at its own time
        (Unix seconds), not now. ``complete``: these were the last of them, so the windows
        are whole again."""
        with self._lock:
            for at, spend in spends:
                self._ledger.record(spend.rule, spend.key_id, spend.value, now=at)
            if complete:
                self._unreplayed = None

    def check(self, intent: SigningIntent, *, policy: Policy | None = None) -> Decision:
        """Allowed by the first rule that grants ``intent``, else refused with the reasons.

        ``policy`` is the one to decide under: one read from :attr:`policy` a moment before,
        so that every decision of a gate call is made under the policy its audit records
        name (:meth:`commit` refuses the decision if that policy is no longer in force).
        The one in force by default.

        Raises :class:`SpendWindowsUnavailable` if the first rule that would otherwise
        allow it has a spend window and the windows are not yet rebuilt."""
        if policy is None:
            policy = self.policy
        covering = [rule for rule in policy.rules if rule.covers(intent)]
        if not covering:
            return Decision(False, None, _uncovered(intent), policy.sha256, intent)
        refusals: list[tuple[str, str]] = []
        with self._lock:
            now = self._now()
            for rule in covering:
                reason = rule.refusal(intent) or self._window_refusal(rule, intent, now)
                if reason is None:
                    return Decision(
                        True, rule.name, f"allowed by rule {rule.name}", policy.sha256, intent
                    )
                refusals.append((rule.name, reason))
        reason = "; ".join(f"rule {name}: {why}" for name, why in refusals)
        return Decision(False, refusals[0][0], reason, policy.sha256, intent)

    def commit(self, decision: Decision, intent: SigningIntent) -> Spend | None:
        """Record the spend of an allowed, now signed, intent against its rule's window, and
        return it for the audit record (``None``: nothing was counted). The spend is the
        intent's value, plus its worst-case fee under a rule with ``count_fees_in_window``:
        what was counted, so that :meth:`replay` counts the same again.

        Refuses (:class:`~signd.errors.AccessDenied`; the caller must discard the signature)
        if the decision was a refusal or for another intent, if the policy was reloaded since
        the check, or if concurrent commits used up the window in the meantime.
        """
        if not decision.allowed or decision.rule is None:
            raise AccessDenied(f"cannot commit a refused request: {decision.reason}")
        if decision.intent is not intent and decision.intent != intent:
            raise AccessDenied("the decision was made for a different request")
        with self._lock:
            policy = self.policy
            rule = policy.rule(decision.rule)
            if policy.sha256 != decision.policy_sha256 or rule is None:
                raise AccessDenied("the policy was reloaded while signing; retry the request")
            now = self._now()
            reason = self._window_refusal(rule, intent, now)
            if reason is not None:
                raise AccessDenied(f"rule {rule.name}: {reason}")
            if rule.max_value_per_window is None:
                return None
            counted = rule.counted(intent)
            if counted == 0:
                return None
            self._ledger.record(rule.name, intent.key_id, counted, now=now)
            return Spend(rule.name, intent.key_id, counted)

    def spent(self, rule: str, key_id: str) -> int:
        """Wei committed under ``rule`` with ``key_id`` within the rule's current window
        (values, and fees under ``count_fees_in_window``)."""
        found = self.policy.rule(rule)
        if found is None or found.max_value_per_window is None:
            return 0
        with self._lock:
            return self._ledger.spent(rule, key_id, window=found.window_seconds, now=self._now())

    def _window_refusal(self, rule: Rule, intent: SigningIntent, now: float) -> str | None:
        limit = rule.max_value_per_window
        if limit is None:
            return None
        counted = rule.counted(intent)
        if counted == 0:
            return None
        if self._unreplayed is not None:
            raise SpendWindowsUnavailable(
                f"rule {rule.name}: its spend window is not yet rebuilt from the audit log "
                f"({self._unreplayed}); requests under rules with windows are refused until "
                "it is"
            )
        spent = self._ledger.spent(rule.name, intent.key_id, window=rule.window_seconds, now=now)
        if spent + counted <= limit:
            return None
        what = f"value {intent.value}"
        if rule.count_fees_in_window and intent.fee:
            what += f" and fee {intent.fee}"
        return (
            f"{what} on top of {spent} spent in the last {rule.window_seconds} s "
            f"exceeds max_value_per_window {limit}"
        )


def longest_window(policy: Policy) -> int:
    """The longest spend window of ``policy``, in seconds (0: it has none)."""
    return max(
        (r.window_seconds for r in policy.rules if r.max_value_per_window is not None),
        default=0,
    )


def _uncovered(intent: SigningIntent) -> str:
    labels = sorted(intent.key_labels)
    return (
        f"no rule covers client {intent.client_id!r} with key labels {labels} "
        f"for {intent.operation.value} on {intent.chain}"
    )
