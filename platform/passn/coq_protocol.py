"""Coq's XML IDE protocol (``coqidetop.opt -main-channel stdfds``, Coq 8.16): calls and replies.

Pure encoding and decoding; the process that speaks it is ``actors.prover.CoqProver``. Facts the
code relies on, each measured against Coq 8.16.1:

- A call is one XML element on stdin; the reply is any number of ``<feedback>`` elements followed
  by one ``<value val="good">`` or ``<value val="fail">``. A failure carries the last good state id
  and the error text.
- ``Add`` parses only the *first* sentence of its text and silently drops the rest, and works
  only at the tip of the document: ``Edit_at`` (spelt so; ``EditAt`` gets no reply at all) goes
  back first; ``Edit_at`` discards every state after its target (editing at one of them later
  fails with ``Stm.Vcs_aux.Expired``), so a branch is entered by replaying. Its argument shape is ``((((sentence, edit_id), (state_id, verbose)), bp), (line, bol))``.
- ``Add`` only parses; the sentence runs at the next ``Goal`` (or ``Status``), which then fails
  with the execution error. After a failure the tip is still the failed state: go back with
  ``Edit_at`` to the good state the failure names before adding again.
- ``Goal`` answers ``<option val="none"/>`` outside a proof, else
  ``<goals><list fg/><list bg/><list shelved/><list given_up/></goals>``; ``bg`` is a stack of
  ``<pair><list before/><list after/></pair>``, innermost focus first (bullets and braces), each
  ``before`` list nearest goal first (reversed).
- Pretty-printed text contains ``&nbsp;``, which is not an XML entity: it is rewritten to
  ``&#160;`` before parsing and the non-breaking spaces to plain spaces after.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from passn.prover import Goal

# ---------------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------------


def init_call() -> str:
    return '<call val="Init"><option val="none"/></call>'


def add_call(sentence: str, state_id: int) -> str:
    """Add one sentence after ``state_id`` (which must be the tip)."""
    return (f'<call val="Add"><pair><pair><pair><pair><string>{escape(sentence)}</string><int>-1</int></pair>'
            f'<pair><state_id val="{state_id}"/><bool val="false"/></pair></pair><int>0</int></pair>'
            '<pair><int>0</int><int>0</int></pair></pair></call>')


def edit_at_call(state_id: int) -> str:
    return f'<call val="Edit_at"><state_id val="{state_id}"/></call>'


def goal_call() -> str:
    return '<call val="Goal"><unit/></call>'


def query_call(command: str, state_id: int) -> str:
    """Run a query command (``Print Assumptions x.``) at ``state_id`` without adding it; its
    output arrives as feedback messages."""
    return (f'<call val="Query"><pair><route_id val="0"/><pair><string>{escape(command)}</string>'
            f'<state_id val="{state_id}"/></pair></pair></call>')


# ---------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Goals:
    """The goals of a proof: ``focused`` and, hidden by bullets or braces, ``unfocused`` (in the
    order they would be shown without any focusing), plus counts of shelved and given-up goals."""

    focused: tuple[Goal, ...]
    unfocused_before: tuple[Goal, ...] = ()
    unfocused_after: tuple[Goal, ...] = ()
    shelved: int = 0
    given_up: int = 0

    @property
    def all(self) -> tuple[Goal, ...]:
        """Every open goal in order, as a proof without bullets would show them."""
        return self.unfocused_before + self.focused + self.unfocused_after

    @property
    def closed(self) -> bool:
        """Nothing left to prove (the proof can be saved with ``Qed``)."""
        return not self.all and not self.shelved and not self.given_up


@dataclasses.dataclass(frozen=True)
class Reply:
    """A call's answer: ``ok``, the ``<value>`` element, the error text and last good state of a
    failure, and the messages the feedback carried (errors, warnings, query output)."""

    ok: bool
    value: ET.Element
    error: str = ""
    good_state: int | None = None
    messages: tuple[tuple[str, str], ...] = ()  # (level, text)


class ProtocolError(RuntimeError):
    """coqidetop sent something that is not the protocol (the message holds the text)."""


def _text(element: ET.Element | None) -> str:
    """The plain text of a pretty-printed (richpp) element, non-breaking spaces as spaces."""
    if element is None:
        return ""
    return "".join(element.itertext()).replace("\xa0", " ").strip()


def parse_reply(data: bytes) -> Reply:
    """The reply made of ``data``: feedback elements then one value element, ending in ``</value>``."""
    raw = data.decode("utf-8", errors="replace").replace("&nbsp;", "&#160;")
    try:
        root = ET.fromstring(f"<reply>{raw}</reply>")
    except ET.ParseError as exc:
        raise ProtocolError(f"unreadable reply from coqidetop ({exc}): {raw[-500:]!r}") from None
    messages = []
    for content in root.iterfind("feedback/feedback_content[@val='message']"):
        message = content.find("message")
        if message is not None:
            level = message.find("message_level")
            messages.append((level.get("val", "") if level is not None else "", _text(message.find("richpp"))))
    value = root.find("value")
    if value is None:
        raise ProtocolError(f"reply without a value: {raw[-500:]!r}")
    if value.get("val") == "good":
        return Reply(True, value, messages=tuple(messages))
    state = value.find("state_id")
    return Reply(False, value, error=_text(value.find("richpp")) or "unknown error",
                 good_state=int(state.get("val", "0")) if state is not None else None, messages=tuple(messages))


def added_state(reply: Reply) -> int:
    """The new state id in a good ``Add`` reply."""
    state = reply.value.find("pair/state_id")
    if state is None:
        raise ProtocolError("Add reply without a state id")
    return int(state.get("val", "0"))


def init_state(reply: Reply) -> int:
    state = reply.value.find("state_id")
    if state is None:
        raise ProtocolError("Init reply without a state id")
    return int(state.get("val", "0"))


def _goal(element: ET.Element) -> Goal:
    hypotheses, conclusion = element.find("list"), element.find("richpp")
    return Goal(tuple(_text(h) for h in (hypotheses if hypotheses is not None else [])), _text(conclusion))


def _goal_list(element: ET.Element | None) -> tuple[Goal, ...]:
    return tuple(_goal(g) for g in element.iterfind("goal")) if element is not None else ()


def parse_goals(reply: Reply) -> Goals | None:
    """The goals in a good ``Goal`` reply; None outside a proof."""
    goals = reply.value.find("option/goals")
    if goals is None:
        return None
    focused, background, shelved, given_up = goals.findall("list")
    before: list[Goal] = []
    after: list[Goal] = []
    for level in background.iterfind("pair"):  # innermost focus first; its "before" list nearest first
        left, right = level.findall("list")
        before[:0] = reversed(_goal_list(left))
        after += _goal_list(right)
    return Goals(_goal_list(focused), tuple(before), tuple(after),
                 len(shelved.findall("goal")), len(given_up.findall("goal")))
