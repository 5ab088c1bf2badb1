// confedge simulated node: join a conference from the browser with the client REST API v2.
// All URLs are relative to this page, so the same page works directly against a node and
// through the confedge HTTPS proxy.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const api = new URL("../api/client/v2/", location.href);
  const call = {
    alias: "", token: "", participant: "", role: "", callUuid: "",
    pc: null, events: null, refreshTimer: null, statsTimer: null, local: null,
    roster: new Map(), syncing: false, seen: new Set(),
  };
  window.confedgeCall = call; // for tests and curious users: call.pc.getStats()

  function setState(s) { $("state").textContent = s; document.body.dataset.state = s; }
  function showError(text) { $("error").textContent = text; $("error").hidden = false; }
  function clearError() { $("error").textContent = ""; $("error").hidden = true; }

  function confUrl(path) {
    return new URL("conferences/" + encodeURIComponent(call.alias) + "/" + path, api);
  }

  async function post(path, body, extraHeaders) {
    const headers = Object.assign({ "Content-Type": "application/json" }, extraHeaders || {});
    if (call.token) headers.token = call.token;
    const resp = await fetch(confUrl(path), {
      method: "POST", headers, body: JSON.stringify(body || {}),
    });
    let json = null;
    try { json = await resp.json(); } catch (e) { json = null; }
    // X-Confedge-Node names the node that answered: behind the edge's proxy it shows where the
    // balancer sent this browser (and, after a failover, that it moved).
    return {
      status: resp.status, json, retryAfter: resp.headers.get("Retry-After"),
      node: resp.headers.get("X-Confedge-Node"),
    };
  }

  function pinMessage(result) {
    if (result && result.pin === "required") {
      return result.guest_pin === "none"
        ? "This conference needs the host PIN (guests: leave the PIN empty)."
        : "This conference needs a PIN.";
    }
    return null;
  }

  async function requestToken(alias, name, pin) {
    const headers = {};
    if (pin) headers.pin = pin;
    let r = await post("request_token", { display_name: name }, headers);
    const result = r.json && r.json.result;
    if (r.status === 403 && !pin && result && result.pin === "required" &&
        result.guest_pin === "none") {
      // Host-only PIN and none given: join as a guest, as the reference web app offers.
      r = await post("request_token", { display_name: name }, { pin: "none" });
    }
    return r;
  }

  function renderRoster() {
    const ul = $("participants");
    ul.replaceChildren();
    for (const p of call.roster.values()) {
      const li = document.createElement("li");
      li.dataset.uuid = p.uuid;
      const me = p.uuid === call.participant ? " (you)" : "";
      const media = p.has_media ? " - in call" : "";
      li.textContent = p.display_name + me + " [" + p.role + "]" + media;
      ul.appendChild(li);
    }
  }

  function onEvent(name, ev) {
    const data = ev.data ? JSON.parse(ev.data) : null;
    if (name === "participant_sync_begin") { call.syncing = true; call.seen = new Set(); return; }
    if (name === "participant_sync_end") {
      call.syncing = false;
      for (const k of [...call.roster.keys()]) if (!call.seen.has(k)) call.roster.delete(k);
    } else if (name === "participant_create" || name === "participant_update") {
      call.roster.set(data.uuid, data);
      if (call.syncing) call.seen.add(data.uuid);
    } else if (name === "participant_delete") {
      call.roster.delete(data.uuid);
    } else if (name === "disconnect") {
      showError("Disconnected by the node: " + ((data && data.reason) || "no reason given"));
      leave(false);
      return;
    }
    renderRoster();
  }

  function openEvents() {
    if (call.events) call.events.close();
    const url = confUrl("events");
    url.searchParams.set("token", call.token);
    const es = new EventSource(url);
    for (const n of ["participant_sync_begin", "participant_sync_end", "participant_create",
      "participant_update", "participant_delete", "disconnect"]) {
      es.addEventListener(n, (ev) => onEvent(n, ev));
    }
    es.onerror = () => {
      // A refused reconnect (old token) closes the source: reopen with the current token.
      if (es.readyState === EventSource.CLOSED && call.token && call.events === es) {
        setTimeout(() => { if (call.events === es) openEvents(); }, 1000);
      }
    };
    call.events = es;
  }

  async function refresh() {
    const r = await post("refresh_token");
    if (r.status === 200 && r.json && r.json.result && r.json.result.token) {
      call.token = r.json.result.token;
    } else if (r.status === 429) {
      // The guard's answer is not JSON: say what it means rather than "null".
      showError("Token refresh refused: this address is blocked" +
        (r.retryAfter ? " for " + r.retryAfter + " s" : "") + " (too many wrong PINs).");
    } else {
      showError("Token refresh failed: " + JSON.stringify(r.json && r.json.result));
    }
  }

  function waitForGathering(pc, ms) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (pc.iceGatheringState === "complete") { resolve(); } };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, ms);
    });
  }

  async function updateStats() {
    if (!call.pc) return;
    const stats = await call.pc.getStats();
    let frames = 0, pairText = "";
    const byId = new Map();
    stats.forEach((s) => byId.set(s.id, s));
    stats.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") frames = s.framesDecoded || 0;
      if (s.type === "transport" && s.selectedCandidatePairId) {
        const pair = byId.get(s.selectedCandidatePairId);
        const remote = pair && byId.get(pair.remoteCandidateId);
        if (remote) {
          pairText = "remote candidate " + remote.candidateType + " " +
            (remote.address || remote.ip) + ":" + remote.port;
        }
      }
    });
    $("stats").textContent = "video frames decoded: " + frames + (pairText ? "; " + pairText : "");
  }

  async function startCall(stunServers) {
    setState("connecting");
    const local = await navigator.mediaDevices.getUserMedia({
      audio: true, video: { width: 640, height: 360, frameRate: 15 },
    });
    call.local = local;
    $("local").srcObject = local;
    const iceServers = (stunServers || []).map((s) => ({ urls: s.urls || s.url }));
    const pc = new RTCPeerConnection({ iceServers });
    call.pc = pc;
    for (const t of local.getTracks()) pc.addTrack(t, local);
    pc.ontrack = (ev) => {
      const stream = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
      if ($("remote").srcObject !== stream) $("remote").srcObject = stream;
    };
    pc.onconnectionstatechange = () => {
      setState(pc.connectionState);
      if (pc.connectionState === "failed") showError("Media connection failed (ICE).");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForGathering(pc, 5000);
    const r = await post("participants/" + call.participant + "/calls",
      { call_type: "WEBRTC", sdp: pc.localDescription.sdp });
    if (r.status !== 200) {
      throw new Error("Call refused (" + r.status + "): " + JSON.stringify(r.json && r.json.result));
    }
    call.callUuid = r.json.result.call_uuid;
    await pc.setRemoteDescription({ type: "answer", sdp: r.json.result.sdp });
    await post("participants/" + call.participant + "/calls/" + call.callUuid + "/ack");
    call.statsTimer = setInterval(updateStats, 1000);
  }

  async function join(ev) {
    ev.preventDefault();
    clearError();
    call.alias = $("alias").value.trim();
    const name = $("name").value.trim();
    const pin = $("pin").value.trim();
    if (!call.alias || !name) { showError("Enter a conference and your name."); return; }
    $("join").disabled = true;
    setState("joining");
    call.token = "";
    try {
      const r = await requestToken(call.alias, name, pin);
      const result = r.json ? r.json.result : null;
      if (r.status !== 200 || !result || !result.token) {
        let text = pinMessage(result) ||
          (typeof result === "string" ? result : "Request refused (HTTP " + r.status + ")");
        if (r.status === 429) {
          // The edge's guard banned this address after too many wrong PINs.
          text = "Too many attempts: this address is blocked" +
            (r.retryAfter ? " for " + r.retryAfter + " s." : " for a while.");
        }
        showError(text);
        setState("error");
        $("join").disabled = false;
        return;
      }
      call.token = result.token;
      call.participant = result.participant_uuid;
      call.role = result.role;
      $("role").textContent = "as " + result.role + " in " + result.conference_name +
        (r.node ? " on " + r.node : "");
      setState("joined");
      const every = Math.max(5, parseInt(result.expires, 10) / 2) * 1000;
      call.refreshTimer = setInterval(refresh, every);
      openEvents();
      $("leave").disabled = false;
      await startCall(result.stun);
    } catch (e) {
      showError(String(e && e.message ? e.message : e));
      setState("error");
      $("join").disabled = false;
    }
  }

  async function leave(tellNode) {
    clearInterval(call.refreshTimer);
    clearInterval(call.statsTimer);
    if (call.events) { call.events.close(); call.events = null; }
    if (tellNode !== false && call.token) {
      try {
        if (call.callUuid) {
          await post("participants/" + call.participant + "/calls/" + call.callUuid + "/disconnect");
        }
        await post("release_token");
      } catch (e) { /* leaving anyway */ }
    }
    if (call.pc) { call.pc.close(); call.pc = null; }
    if (call.local) { for (const t of call.local.getTracks()) t.stop(); call.local = null; }
    call.token = ""; call.callUuid = "";
    call.roster.clear();
    renderRoster();
    $("join").disabled = false;
    $("leave").disabled = true;
    setState("idle");
  }

  $("joinform").addEventListener("submit", join);
  $("leave").addEventListener("click", () => leave(true));
  window.addEventListener("pagehide", () => {
    if (call.token) {
      fetch(confUrl("release_token"), {
        method: "POST", headers: { token: call.token }, keepalive: true,
      }).catch(() => {});
    }
  });
  const params = new URLSearchParams(location.search);
  if (params.get("alias")) $("alias").value = params.get("alias");
})();
