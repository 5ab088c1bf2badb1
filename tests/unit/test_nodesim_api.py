"""The simulated node's client REST API v2 (SPEC §7), driven through the sans-I/O core in
simulated time: every status code and body the proxy, the guard and the web page rely on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from confedge.nodesim.core import (
    CallRequest,
    Conference,
    JsonResponse,
    NodeState,
    Request,
    StreamRequest,
    Subscription,
    TurnInfo,
)

P = "/api/client/v2/conferences"
INVALID_TOKEN = {"status": "success", "result": "Invalid token"}


def req(
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Request:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    return Request(method, path, query or {}, headers or {}, data)


def node(**kw: Any) -> NodeState:
    confs = [
        Conference("meet", "1234", "5678"),
        Conference("hostonly", "4321"),
        Conference("open"),
    ]
    return NodeState(confs, kw.pop("turn", None), "n1", **kw)


def json_of(resp: object) -> tuple[int, Any]:
    assert isinstance(resp, JsonResponse), resp
    return resp.status, json.loads(resp.encode())


def join(
    st: NodeState, alias: str, pin: str | None, name: str = "Alice", now: float = 0.0
) -> dict[str, Any]:
    headers = {} if pin is None else {"pin": pin}
    status, body = json_of(
        st.handle(
            req("POST", f"{P}/{alias}/request_token", {"display_name": name}, headers=headers), now
        )
    )
    assert status == 200, body
    result: dict[str, Any] = body["result"]
    return result


def drain(sub: Subscription) -> list[tuple[str, Any]]:
    out = [(e.name, e.data) for e in sub.events]
    sub.events.clear()
    return out


# ------------------------------------------------------------------ status


def test_status_200_then_503_in_maintenance() -> None:
    st = node()
    assert json_of(st.handle(req("GET", "/api/client/v2/status"), 0)) == (
        200,
        {"status": "success", "result": "OK"},
    )
    st.set_maintenance(True)
    status, body = json_of(st.handle(req("GET", "/api/client/v2/status"), 0))
    assert status == 503
    assert body["status"] == "failed"
    st.set_maintenance(False)
    assert json_of(st.handle(req("GET", "/api/client/v2/status"), 0))[0] == 200


def test_maintenance_refuses_new_tokens_but_allows_release() -> None:
    st = node()
    tok = join(st, "open", None)["token"]
    st.set_maintenance(True)
    r = st.handle(req("POST", f"{P}/open/request_token", {"display_name": "x"}), 1)
    assert json_of(r)[0] == 503
    r = st.handle(req("POST", f"{P}/open/release_token", headers={"token": tok}), 1)
    assert json_of(r) == (200, {"status": "success", "result": True})
    assert st.participants == {}


def test_maintenance_keeps_people_already_on_the_node() -> None:
    """Like a real node: maintenance refuses joins and new calls, not the sessions it holds."""
    st = node()
    res = join(st, "open", None)
    tok, uuid = res["token"], res["participant_uuid"]
    st.set_maintenance(True)
    status, body = json_of(
        st.handle(req("POST", f"{P}/open/refresh_token", headers={"token": tok}), 60)
    )
    assert status == 200
    tok = body["result"]["token"]
    r = st.handle(req("GET", f"{P}/open/participants", headers={"token": tok}), 61)
    assert json_of(r)[0] == 200
    offer = {"call_type": "WEBRTC", "sdp": "v=0"}
    r = st.handle(
        req("POST", f"{P}/open/participants/{uuid}/calls", offer, headers={"token": tok}), 62
    )
    assert json_of(r) == (503, {"status": "failed", "result": "Maintenance mode"})


# ------------------------------------------------------------------ request_token


def test_pin_required_with_guest_pin() -> None:
    st = node()
    r = st.handle(req("POST", f"{P}/meet/request_token", {"display_name": "A"}), 0)
    assert json_of(r) == (
        403,
        {"status": "success", "result": {"pin": "required", "guest_pin": "required"}},
    )


def test_pin_required_host_only_says_guest_pin_none() -> None:
    st = node()
    r = st.handle(req("POST", f"{P}/hostonly/request_token", {"display_name": "A"}), 0)
    assert json_of(r) == (
        403,
        {"status": "success", "result": {"pin": "required", "guest_pin": "none"}},
    )


def test_empty_pin_header_is_a_prompt_not_a_failure() -> None:
    st = node()
    r = st.handle(
        req("POST", f"{P}/meet/request_token", {"display_name": "A"}, headers={"pin": ""}), 0
    )
    assert json_of(r)[1]["result"]["pin"] == "required"


@pytest.mark.parametrize("pin", ["0000", "12345", "none", "1234 ", "5678x"])
def test_wrong_pin(pin: str) -> None:
    st = node()
    r = st.handle(
        req("POST", f"{P}/meet/request_token", {"display_name": "A"}, headers={"pin": pin}), 0
    )
    assert json_of(r) == (403, {"status": "success", "result": "Invalid PIN"})
    assert st.participants == {}


def test_unknown_alias_404() -> None:
    st = node()
    r = st.handle(req("POST", f"{P}/nosuch/request_token", {"display_name": "A"}), 0)
    assert json_of(r) == (
        404,
        {"status": "success", "result": "Neither conference nor gateway found"},
    )


def test_roles_by_pin() -> None:
    st = node()
    assert join(st, "meet", "1234")["role"] == "HOST"
    assert join(st, "meet", "5678")["role"] == "GUEST"
    assert join(st, "hostonly", "4321")["role"] == "HOST"
    assert join(st, "hostonly", "none")["role"] == "GUEST"
    assert join(st, "hostonly", "NONE")["role"] == "GUEST"
    assert join(st, "open", None)["role"] == "HOST"
    assert join(st, "open", "whatever")["role"] == "HOST"


def test_pin_in_body_is_accepted_when_no_header() -> None:
    st = node()
    r = st.handle(req("POST", f"{P}/meet/request_token", {"display_name": "A", "pin": "5678"}), 0)
    assert json_of(r)[1]["result"]["role"] == "GUEST"


def test_alias_is_case_insensitive() -> None:
    st = node()
    assert join(st, "MEET", "1234")["conference_name"] == "meet"


def test_success_body_shape() -> None:
    st = node(turn=TurnInfo("127.0.0.1", 3478, "u", "p"))
    res = join(st, "meet", "1234", name="  Bob  ")
    assert res["expires"] == "120"
    assert isinstance(res["token"], str) and len(res["token"]) >= 32
    assert res["participant_uuid"] in st.participants
    assert res["display_name"] == "Bob"
    assert res["role"] == "HOST"
    assert res["conference_name"] == "meet"
    assert res["service_type"] == res["current_service_type"] == "conference"
    assert res["version"]["version_id"]
    assert res["chat_enabled"] is False
    assert res["stun"] == [{"url": "stun:127.0.0.1:3478"}]
    assert res["turn"] == []  # restricted mode: browsers get no TURN credential


def test_no_turn_means_no_stun() -> None:
    assert join(node(), "open", None)["stun"] == []


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b"{}", "display_name is required"),
        (b'{"display_name": ""}', "display_name is required"),
        (b'{"display_name": 7}', "display_name is required"),
        (json.dumps({"display_name": "x" * 300}).encode(), "at most 256"),
        (b'{"display_name": "a\\u0000b"}', "printable"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_request_token_body_400(raw: bytes, reason: str) -> None:
    st = node()
    status, body = json_of(st.handle(req("POST", f"{P}/open/request_token", raw=raw), 0))
    assert status == 400
    assert body["status"] == "failure"
    assert reason in body["result"]


def test_wrong_method_405() -> None:
    st = node()
    assert json_of(st.handle(req("GET", f"{P}/open/request_token"), 0))[0] == 405
    assert json_of(st.handle(req("POST", "/api/client/v2/status"), 0))[0] == 405
    tok = join(st, "open", None)["token"]
    assert json_of(st.handle(req("POST", f"{P}/open/events", headers={"token": tok}), 0))[0] == 405
    assert json_of(st.handle(req("HEAD", f"{P}/open/events", headers={"token": tok}), 0))[0] == 405
    assert (
        json_of(st.handle(req("GET", f"{P}/open/refresh_token", headers={"token": tok}), 0))[0]
        == 405
    )


def test_unknown_paths_404() -> None:
    st = node()
    tok = join(st, "open", None)["token"]
    for path in ("/api/client/v2/nothing", "/api/client/v2/conferences", "/other", f"{P}/open/xyz"):
        assert json_of(st.handle(req("POST", path, headers={"token": tok}), 0))[0] == 404, path


# ------------------------------------------------------------------ tokens


def test_token_in_header_or_query() -> None:
    st = node()
    tok = join(st, "open", None)["token"]
    r1 = st.handle(req("GET", f"{P}/open/conference_status", headers={"token": tok}), 1)
    r2 = st.handle(req("GET", f"{P}/open/conference_status", query={"token": tok}), 1)
    assert json_of(r1) == json_of(r2)
    assert json_of(r1)[1]["result"]["locked"] is False


@pytest.mark.parametrize(
    "route",
    ["refresh_token", "release_token", "conference_status", "participants", "events"],
)
def test_missing_or_unknown_token_403(route: str) -> None:
    st = node()
    join(st, "open", None)
    method = "GET" if route in ("conference_status", "participants", "events") else "POST"
    for headers in ({}, {"token": "bogus"}):
        r = st.handle(req(method, f"{P}/open/{route}", headers=headers), 1)
        assert json_of(r) == (403, INVALID_TOKEN), (route, headers)


def test_token_is_bound_to_its_conference() -> None:
    st = node()
    tok = join(st, "open", None)["token"]
    r = st.handle(req("GET", f"{P}/meet/participants", headers={"token": tok}), 1)
    assert json_of(r) == (403, INVALID_TOKEN)


def test_token_expires_after_120_s_simulated() -> None:
    st = node()
    res = join(st, "open", None, now=1000.0)
    tok = res["token"]
    ok = st.handle(req("GET", f"{P}/open/participants", headers={"token": tok}), 1119.9)
    assert json_of(ok)[0] == 200
    late = st.handle(req("GET", f"{P}/open/participants", headers={"token": tok}), 1120.0)
    assert json_of(late) == (403, INVALID_TOKEN)
    # An expired token cannot be refreshed either.
    r = st.handle(req("POST", f"{P}/open/refresh_token", headers={"token": tok}), 1120.0)
    assert json_of(r) == (403, INVALID_TOKEN)


def test_refresh_gives_new_token_and_invalidates_old() -> None:
    st = node()
    res = join(st, "open", None, now=0.0)
    old = res["token"]
    status, body = json_of(
        st.handle(req("POST", f"{P}/open/refresh_token", headers={"token": old}), 100.0)
    )
    assert status == 200
    new = body["result"]["token"]
    assert body["result"]["expires"] == "120"
    assert new != old
    assert json_of(
        st.handle(req("GET", f"{P}/open/participants", headers={"token": old}), 100.0)
    ) == (
        403,
        INVALID_TOKEN,
    )
    # The new token lives 120 s from the refresh, beyond the old one's expiry.
    r = st.handle(req("GET", f"{P}/open/participants", headers={"token": new}), 219.0)
    assert json_of(r)[0] == 200
    assert (
        json_of(st.handle(req("GET", f"{P}/open/participants", headers={"token": new}), 220.0))[0]
        == 403
    )


def test_refreshing_keeps_the_participant_alive_across_sweeps() -> None:
    st = node()
    tok = join(st, "open", None, now=0.0)["token"]
    now = 0.0
    for _ in range(10):
        now += 60.0
        st.sweep(now)
        r = st.handle(req("POST", f"{P}/open/refresh_token", headers={"token": tok}), now)
        tok = json_of(r)[1]["result"]["token"]
    assert len(st.participants) == 1


def test_sweep_removes_expired_participant_and_tells_others() -> None:
    st = node()
    a = join(st, "open", None, "A", now=0.0)
    b = join(st, "open", None, "B", now=100.0)
    sub = st.handle(req("GET", f"{P}/open/events", headers={"token": b["token"]}), 100.0)
    assert isinstance(sub, StreamRequest)
    drain(sub.subscription)
    st.sweep(119.0)
    assert a["participant_uuid"] in st.participants
    st.sweep(120.0)
    assert a["participant_uuid"] not in st.participants
    assert drain(sub.subscription) == [("participant_delete", {"uuid": a["participant_uuid"]})]


def test_release_token_removes_participant() -> None:
    st = node()
    res = join(st, "open", None)
    tok = res["token"]
    r = st.handle(req("POST", f"{P}/open/release_token", headers={"token": tok}), 1)
    assert json_of(r) == (200, {"status": "success", "result": True})
    assert st.participants == {}
    r = st.handle(req("POST", f"{P}/open/release_token", headers={"token": tok}), 1)
    assert json_of(r) == (403, INVALID_TOKEN)


# ------------------------------------------------------------------ participants and events


def test_participants_list() -> None:
    st = node()
    a = join(st, "meet", "1234", "Host")
    join(st, "meet", "5678", "Guest")
    join(st, "open", None, "Elsewhere")
    status, body = json_of(
        st.handle(req("GET", f"{P}/meet/participants", headers={"token": a["token"]}), 1)
    )
    assert status == 200 and body["status"] == "success"
    names = {(p["display_name"], p["role"]) for p in body["result"]}
    assert names == {("Host", "chair"), ("Guest", "guest")}
    p0 = body["result"][0]
    assert p0["uuid"] == a["participant_uuid"]
    assert p0["local_alias"] == "meet"
    assert p0["protocol"] == "api" and p0["has_media"] is False


def test_events_sync_bracket_then_live_events() -> None:
    st = node()
    a = join(st, "meet", "1234", "A")
    b = join(st, "meet", "5678", "B")
    r = st.handle(req("GET", f"{P}/meet/events", query={"token": a["token"]}), 1)
    assert isinstance(r, StreamRequest)
    sub = r.subscription
    ev = drain(sub)
    assert [n for n, _ in ev] == [
        "participant_sync_begin",
        "participant_create",
        "participant_create",
        "participant_sync_end",
    ]
    assert ev[0][1] is None and ev[3][1] is None
    assert {d["uuid"] for _, d in ev[1:3]} == {a["participant_uuid"], b["participant_uuid"]}
    # Live: a join, a call (update), a leave.
    c = join(st, "meet", "5678", "C")
    ((name, data),) = drain(sub)
    assert name == "participant_create" and data["uuid"] == c["participant_uuid"]
    call = st.add_call(c["participant_uuid"])
    assert call is not None
    upd = drain(sub)
    assert [n for n, _ in upd] == ["participant_update"]
    assert upd[0][1]["has_media"] is True and upd[0][1]["protocol"] == "webrtc"
    st.handle(req("POST", f"{P}/meet/release_token", headers={"token": c["token"]}), 2)
    assert drain(sub) == [("participant_delete", {"uuid": c["participant_uuid"]})]
    assert st.closed_calls == [call]


def test_live_create_event_carries_the_participant() -> None:
    st = node()
    a = join(st, "open", None, "A")
    r = st.handle(req("GET", f"{P}/open/events", headers={"token": a["token"]}), 1)
    assert isinstance(r, StreamRequest)
    drain(r.subscription)
    c = join(st, "open", None, "Carol")
    ((name, data),) = drain(r.subscription)
    assert name == "participant_create"
    assert data["uuid"] == c["participant_uuid"] and data["display_name"] == "Carol"


def test_events_only_for_own_conference() -> None:
    st = node()
    a = join(st, "meet", "1234")
    r = st.handle(req("GET", f"{P}/meet/events", headers={"token": a["token"]}), 1)
    assert isinstance(r, StreamRequest)
    drain(r.subscription)
    join(st, "open", None)
    assert drain(r.subscription) == []


def test_own_removal_ends_own_stream_with_disconnect() -> None:
    st = node()
    a = join(st, "open", None)
    r = st.handle(req("GET", f"{P}/open/events", headers={"token": a["token"]}), 1)
    assert isinstance(r, StreamRequest)
    drain(r.subscription)
    st.sweep(500.0)
    assert drain(r.subscription) == [("disconnect", {"reason": "Token expired"})]
    assert r.subscription.closed


def test_sse_wire_format() -> None:
    from confedge.nodesim.core import SseEvent

    assert (
        SseEvent("participant_sync_begin", None).encode()
        == b"event: participant_sync_begin\ndata: \n\n"
    )
    assert SseEvent("participant_delete", {"uuid": "u"}).encode() == (
        b'event: participant_delete\ndata: {"uuid":"u"}\n\n'
    )


# ------------------------------------------------------------------ calls and disconnect


OFFER = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


def test_calls_request_is_validated_then_handed_to_the_adapter() -> None:
    st = node()
    a = join(st, "open", None)
    me, tok = a["participant_uuid"], a["token"]
    path = f"{P}/open/participants/{me}/calls"
    r = st.handle(
        req("POST", path, {"call_type": "WEBRTC", "sdp": OFFER}, headers={"token": tok}), 1
    )
    assert r == CallRequest("open", me, OFFER)
    for body, reason in (
        ({"call_type": "SIP", "sdp": OFFER}, "WEBRTC"),
        ({"call_type": "WEBRTC"}, "sdp is required"),
        ({"call_type": "WEBRTC", "sdp": "hello"}, "sdp is required"),
        ({"call_type": "WEBRTC", "sdp": "v=0\r\ns=-\r\n"}, "no audio or video"),
        ({"call_type": "WEBRTC", "sdp": OFFER + "a" * 70000}, "larger"),
    ):
        status, out = json_of(st.handle(req("POST", path, body, headers={"token": tok}), 1))
        assert status == 400 and reason in out["result"] and out["status"] == "failure"
    r = st.handle(req("POST", path, {"sdp": OFFER}), 1)
    assert json_of(r) == (403, INVALID_TOKEN)


def test_calls_for_someone_else_refused() -> None:
    st = node()
    a = join(st, "meet", "5678", "guest")
    b = join(st, "meet", "1234", "host")
    path = f"{P}/meet/participants/{b['participant_uuid']}/calls"
    r = st.handle(req("POST", path, {"sdp": OFFER}, headers={"token": a["token"]}), 1)
    assert json_of(r)[0] == 403
    path = f"{P}/meet/participants/00000000-0000-0000-0000-000000000000/calls"
    r = st.handle(req("POST", path, {"sdp": OFFER}, headers={"token": a["token"]}), 1)
    assert json_of(r) == (404, {"status": "failure", "result": "Participant not found"})


def test_ack_and_call_disconnect() -> None:
    st = node()
    a = join(st, "open", None)
    me, tok = a["participant_uuid"], a["token"]
    call = st.add_call(me)
    base = f"{P}/open/participants/{me}/calls/{call}"
    assert json_of(st.handle(req("POST", base + "/ack", headers={"token": tok}), 1)) == (
        200,
        {"status": "success", "result": None},
    )
    assert json_of(st.handle(req("POST", base + "/disconnect", headers={"token": tok}), 1)) == (
        200,
        {"status": "success", "result": True},
    )
    assert st.closed_calls == [call]
    assert json_of(st.handle(req("POST", base + "/ack", headers={"token": tok}), 1))[0] == 404
    assert st.participants[me].calls == set()


def test_participant_disconnect_self_and_by_host() -> None:
    st = node()
    host = join(st, "meet", "1234", "host")
    g1 = join(st, "meet", "5678", "g1")
    g2 = join(st, "meet", "5678", "g2")
    # A guest cannot disconnect someone else.
    path = f"{P}/meet/participants/{host['participant_uuid']}/disconnect"
    assert json_of(st.handle(req("POST", path, headers={"token": g1["token"]}), 1))[0] == 403
    # A guest can leave.
    path = f"{P}/meet/participants/{g1['participant_uuid']}/disconnect"
    assert json_of(st.handle(req("POST", path, headers={"token": g1["token"]}), 1)) == (
        200,
        {"status": "success", "result": True},
    )
    # A host can disconnect a guest.
    path = f"{P}/meet/participants/{g2['participant_uuid']}/disconnect"
    assert json_of(st.handle(req("POST", path, headers={"token": host["token"]}), 1))[0] == 200
    assert set(st.participants) == {host["participant_uuid"]}
    # Their tokens died with them.
    r = st.handle(req("GET", f"{P}/meet/participants", headers={"token": g2["token"]}), 1)
    assert json_of(r) == (403, INVALID_TOKEN)


def test_add_call_after_participant_left_returns_none() -> None:
    st = node()
    a = join(st, "open", None)
    st.remove_participant(a["participant_uuid"], "gone")
    assert st.add_call(a["participant_uuid"]) is None


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("meet", Conference("meet")),
        ("meet:1234", Conference("meet", "1234")),
        ("meet:1234:5678", Conference("meet", "1234", "5678")),
        ("meet::", Conference("meet")),
    ],
)
def test_conference_parse(text: str, expected: Conference) -> None:
    assert Conference.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("", "alias"),
        ("a/b", "alias"),
        ("meet::5678", "guest PIN needs a host PIN"),
        ("meet:1:1", "must differ"),
        ("meet:none", "host PIN"),
        ("a:b:c:d", "alias[:hostpin[:guestpin]]"),
    ],
)
def test_conference_parse_errors(text: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        Conference.parse(text)


def test_duplicate_alias_rejected() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        NodeState([Conference("a"), Conference("A")])


def test_stalled_stream_is_ended_not_buffered_forever() -> None:
    from confedge.nodesim.core import MAX_PENDING_EVENTS

    st = node()
    a = join(st, "open", None, "reader")
    r = st.handle(req("GET", f"{P}/open/events", headers={"token": a["token"]}), 1)
    assert isinstance(r, StreamRequest)
    for i in range(MAX_PENDING_EVENTS + 10):
        join(st, "open", None, f"p{i}")
    assert r.subscription.closed
    assert len(r.subscription.events) <= MAX_PENDING_EVENTS
