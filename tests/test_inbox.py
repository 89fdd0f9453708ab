"""The receive-side buffer policy on its own: what is kept, refused or discarded, and when a
receive may stop waiting for a sender."""

from collections import Counter

import pytest
import torch

from gossipfl.transport.base import Message
from gossipfl.transport.inbox import Inbox

HONEST, OTHER = b"conn-honest", b"conn-other"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def inbox():
    drops = Counter()
    clock = Clock()
    box = Inbox(per_sender=2, rounds_ahead=2, ttl_s=10.0, drop=lambda reason, sender: drops.update([reason]),
                clock=clock)
    box.drops, box.clock = drops, clock
    return box


def message(sender, round_index, step, kind="model"):
    return Message(kind, sender, round_index, step, torch.zeros(3))


def receive(inbox, round_index, step, senders, arrivals=()):
    """One receive: begin, offer what arrives meanwhile, end."""
    inbox.begin("model", round_index, step, senders)
    for m, connection in arrivals:
        inbox.offer(m, connection)
    done = inbox.complete()
    return inbox.end(), done


def test_current_and_kept_messages_are_returned(inbox):
    inbox.offer(message(1, 0, 1), HONEST)  # before its receive: kept
    got, done = receive(inbox, 0, 0, {1}, [(message(1, 0, 0), HONEST)])
    assert list(got) == [1] and done
    got, _ = receive(inbox, 0, 1, {1})
    assert list(got) == [1] and not inbox.drops


def test_late_duplicate_and_unexpected_senders_are_counted(inbox):
    receive(inbox, 0, 1, {1}, [(message(1, 0, 1), HONEST), (message(1, 0, 1), HONEST), (message(2, 0, 1), OTHER)])
    inbox.offer(message(1, 0, 0), HONEST)  # a step already past
    inbox.offer(message(1, 1, 0), HONEST)
    inbox.offer(message(1, 1, 0), HONEST)
    assert inbox.drops == {"duplicate": 2, "unexpected_sender": 1, "late": 1}


def test_the_window_refuses_far_future_rounds_but_records_the_claim(inbox):
    receive(inbox, 5, 0, {1}, [(message(1, 5, 0), HONEST)])
    inbox.offer(message(1, 7, 0), HONEST)  # two rounds ahead: kept
    inbox.offer(message(1, 8, 0), HONEST)  # three: refused
    assert inbox.drops == {"too_far_ahead": 1} and inbox.claimed_rounds() == {1: 8}


def test_once_a_sender_is_pinned_only_its_own_connection_claims_rounds_for_it(inbox):
    inbox.offer(message(2, 9, 0), OTHER)  # node 2 is not pinned (as after a resume): any claim counts
    receive(inbox, 0, 0, {1}, [(message(1, 0, 0), HONEST)])  # pins node 1 to HONEST
    inbox.offer(message(1, 2, 0), OTHER)  # an impostor's claim for node 1
    assert inbox.claimed_rounds() == {1: 0, 2: 9}
    inbox.offer(message(1, 1, 0), HONEST)
    assert inbox.claimed_rounds() == {1: 1, 2: 9}


def test_kept_messages_beyond_the_window_are_discarded_once_the_base_is_known(inbox):
    inbox.offer(message(1, 100, 0), OTHER)  # before any receive there is no base to measure from
    receive(inbox, 0, 0, {1}, [(message(1, 0, 0), HONEST)])
    assert inbox.drops == {"too_far_ahead": 1} and inbox.claimed_rounds() == {1: 100}


def test_each_sender_has_its_own_share(inbox):
    for step in range(1, 5):
        inbox.offer(message(2, 0, step), OTHER)  # two kept, two refused
    inbox.offer(message(1, 0, 1), HONEST)
    inbox.offer(message(1, 0, 2), HONEST)
    assert inbox.drops == {"buffer_full": 2}
    got, done = receive(inbox, 0, 0, {1, 2}, [(message(1, 0, 0), HONEST), (message(2, 0, 0), OTHER)])
    assert sorted(got) == [1, 2] and done  # the current step is never refused for space


def test_kept_messages_expire(inbox):
    inbox.offer(message(1, 0, 3), HONEST)
    inbox.clock.now = 11.0
    receive(inbox, 0, 0, {1})
    assert inbox.drops == {"expired": 1}


def test_only_the_pinned_connection_proves_a_sender_moved_on(inbox):
    receive(inbox, 0, 0, {1}, [(message(1, 0, 0), HONEST)])  # pins sender 1 to HONEST
    inbox.begin("model", 0, 1, {1})
    inbox.offer(message(1, 0, 5), OTHER)  # an impostor's claim
    assert not inbox.complete()
    inbox.offer(message(1, 0, 4), HONEST)  # the real sender is past step 1
    assert inbox.complete()
    assert inbox.end() == {}


def test_a_later_message_kept_before_the_receive_also_ends_it(inbox):
    receive(inbox, 0, 0, {1}, [(message(1, 0, 0), HONEST)])
    inbox.offer(message(1, 0, 2), HONEST)
    _, done = receive(inbox, 0, 1, {1})
    assert done


def test_a_new_connection_gets_no_shortcut_until_its_message_is_returned(inbox):
    receive(inbox, 0, 0, {1}, [(message(1, 0, 0), HONEST)])
    restarted = b"conn-restarted"
    got, done = receive(inbox, 0, 1, {1}, [(message(1, 0, 2), restarted)])
    assert got == {} and not done  # a claim from an unpinned connection: keep waiting
    got, _ = receive(inbox, 0, 2, {1})
    assert list(got) == [1]  # returned: sender 1 is now pinned to the new connection
    _, done = receive(inbox, 0, 3, {1}, [(message(1, 0, 4), restarted)])
    assert done


def test_an_authenticated_connection_proves_its_sender_moved_on(inbox):
    inbox.begin("model", 0, 0, {1})
    inbox.offer(message(1, 0, 3), b"conn-with-node-1-key", authenticated=True)
    assert inbox.complete()
