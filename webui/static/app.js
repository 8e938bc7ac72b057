// fencer UI: hash-routed pages over the REST API. Every text goes through textContent (no HTML
// from data), every URL is relative (the UI may sit behind a proxy prefix), and every write
// sends the double-submit CSRF header.
"use strict";

const API = "../api";
const POLL_MS = 3000;
let schemas = {};
let pollTimer = null;

// The feature design's IPMI tab, in its order. kind: text | password | number | bool | enum.
const IPMI_FIELDS = [
  ["action", "Default fencing action", "enum:FenceAction"],
  ["username", "IPMI username", "text"],
  ["password", "IPMI password", "password"],
  ["exec", "IPMI exec", "text"],
  ["action_stop", "IPMI action stop", "text"],
  ["action_start", "IPMI action start", "text"],
  ["action_reboot", "IPMI action reboot", "text"],
  ["action_blink", "IPMI action blink", "text"],
  ["action_test", "IPMI action test", "text"],
  ["execution_syntax", "IPMI execution syntax", "text"],
  ["driver", "Driver", "enum:Driver"],
  ["password_via", "Password passed via", "enum:PasswordVia"],
  ["port", "BMC port", "number"],
  ["redfish_system", "Redfish system id", "text"],
  ["verify_tls", "Verify TLS (Redfish)", "bool"],
  ["restart_via", "Restart VMs via", "enum:RestartVia"],
  ["restart_without_fence", "Restart VMs without a power-down", "bool"],
  ["allow_insecure_redfish", "Allow http:// Redfish (password in clear)", "bool"],
  ["storage_fence", "Ceph storage fence (blocklist)", "enum:StorageFence"],
];
const DECISION_ACTIONS = ["nothing", "stop", "reboot", "blink"];

// -- helpers ----------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function cookie(name) {
  const m = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return m ? decodeURIComponent(m.slice(name.length + 1)) : "";
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status;
    this.fields = (body && body.fields) || [];
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = cookie("fencer_csrf");
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 401 && path !== "/login") { showLogin(); throw new ApiError(401, data); }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

function when(at) {
  if (at === null || at === undefined) return "—";
  return new Date(at * 1000).toLocaleString();
}

function ago(at) {
  if (!at) return "—";
  const s = Math.max(0, Date.now() / 1000 - at);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function badge(text, cls) { return h("span", { class: `badge ${cls}` }, text === "no_record" ? "no record yet" : text); }

function banner(text, ok) {
  const b = document.getElementById("banner");
  b.textContent = text || "";
  b.hidden = !text;
  b.classList.toggle("ok", !!ok);
}

// replaceChildren() would print null as "null": drop the empty parts first.
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function main(...children) { fill(document.getElementById("main"), ...children); }

function show(v) {
  if (v === null || v === undefined || v === "") return "(none)";
  if (v === true) return "yes";
  if (v === false) return "no";
  return String(v);
}

// -- login and chrome -------------------------------------------------------------------------

function showLogin() {
  stopPolling();
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("global-pause").hidden = true;
  const input = h("input", { type: "password", id: "token", autocomplete: "current-password" });
  const err = h("div", { class: "error", id: "login-error" });
  main(h("form", {
    class: "login", id: "login-form",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("POST", "/login", { token: input.value });
        input.value = "";
        await start();
      } catch (ex) { err.textContent = ex.message; }
    },
  }, h("h1", {}, "Log in to fencer"),
    h("label", { for: "token" }, "API token (api.token in the fencer settings)"),
    input, h("button", { class: "primary", type: "submit" }, "Log in"), err));
  input.focus();
}

async function refreshGlobalPause() {
  const p = await api("GET", "/pause");
  const gp = p.global_pause;
  const box = document.getElementById("global-pause");
  const state = document.getElementById("global-pause-state");
  const btn = document.getElementById("global-pause-toggle");
  box.hidden = false;
  state.textContent = gp.paused ? `Fencing paused everywhere${gp.reason ? ": " + gp.reason : ""}` : "Fencing active";
  state.className = gp.paused ? "paused" : "muted";
  btn.textContent = gp.paused ? "Resume all fencing" : "Pause all fencing";
  btn.onclick = async () => {
    try {
      if (gp.paused) await api("POST", "/resume");
      else {
        const reason = prompt("Pause fencing in every cluster. Reason (shown to others):", "");
        if (reason === null) return;
        await api("POST", "/pause", { reason: reason || null });
      }
      await refreshGlobalPause();
      route();
    } catch (ex) { banner(ex.message); }
  };
  return p;
}

// -- pages ------------------------------------------------------------------------------------

async function hostsPage() {
  const body = h("tbody", { id: "host-rows" });
  main(h("h1", {}, "Hosts"),
    h("p", { class: "muted small" }, `Live: refreshed every ${POLL_MS / 1000} s.`),
    h("table", { id: "hosts" }, h("thead", {}, h("tr", {},
      h("th", {}, "Host"), h("th", {}, "Cluster"), h("th", {}, "CloudStack state"),
      h("th", {}, "Fencing state"), h("th", {}, "Stale checks"), h("th", {}, "Last probe"))), body));
  const load = async () => {
    const hosts = await api("GET", "/hosts");
    fill(body, hosts.map((x) => {
      const f = x.fencing, p = f.last_probe;
      return h("tr", { class: "clickable", "data-host": x.uuid, onclick: () => { location.hash = `#/host/${x.uuid}`; } },
        h("td", {}, h("a", { href: `#/host/${x.uuid}` }, x.name), h("div", { class: "muted small" }, x.ip_address || "")),
        h("td", {}, x.cluster_uuid ? h("a", { href: `#/cluster/${x.cluster_uuid}`, onclick: (e) => e.stopPropagation() }, x.cluster_name || x.cluster_uuid) : "—"),
        h("td", {}, x.status || "—"),
        h("td", {}, badge(f.state, `state-${f.state}`)),
        h("td", {}, f.stale_checks),
        h("td", {}, p ? [badge(p.evidence, `ev-${p.evidence}`), " ", ago(p.finished_at)] : "—"));
    }));
  };
  await load();
  pollTimer = setInterval(() => load().catch((e) => banner(e.message)), POLL_MS);
}

async function clustersPage() {
  const clusters = await api("GET", "/clusters");
  main(h("h1", {}, "Clusters"),
    h("table", { id: "clusters" }, h("thead", {}, h("tr", {},
      h("th", {}, "Cluster"), h("th", {}, "Zone"), h("th", {}, "Hosts"),
      h("th", {}, "Fencing"), h("th", {}, "Power-downs in window"))),
    h("tbody", {}, clusters.map((c) => h("tr", { class: "clickable", onclick: () => { location.hash = `#/cluster/${c.uuid}`; } },
      h("td", {}, h("a", { href: `#/cluster/${c.uuid}` }, c.name)),
      h("td", {}, c.zone_name || "—"), h("td", {}, c.host_count),
      h("td", {}, c.paused ? h("span", { class: "paused" }, "paused") : "active"),
      h("td", {}, `${c.budget.used} / ${c.budget.cap}`))))));
}

function enumValues(kind) {
  const name = kind.split(":")[1];
  if (name === "FenceAction") return DECISION_ACTIONS;
  return (schemas[name] && schemas[name].enum) || [];
}

// One input per IPMI field. `current` is the value set at this level (null = inherit) and
// `inherited` the value that applies when it is empty, shown beside it.
function fieldRow(name, label, kind, current, inherited, source, extra) {
  const id = `f-${name}`;
  let input;
  let inh = `inherits: ${show(inherited)}`;
  if (kind === "password") inh = extra.passwordSet ? `a password is set (${extra.passwordSource})` : "no password set";
  if (kind === "password" && extra.passwordError) inh = `UNUSABLE: ${extra.passwordError}`;
  else if (name === "address") inh = "set per host (no inheritance)";
  if (kind.startsWith("enum:")) {
    input = h("select", { id, name },
      h("option", { value: "" }, `(inherit: ${show(inherited)})`),
      enumValues(kind).map((v) => h("option", { value: v, selected: current === v,
        disabled: name === "driver" && extra.settableDrivers && !extra.settableDrivers.includes(v) && current !== v }, v)));
  } else if (kind === "bool") {
    input = h("select", { id, name },
      h("option", { value: "" }, `(inherit: ${show(inherited)})`),
      h("option", { value: "true", selected: current === true }, "yes"),
      h("option", { value: "false", selected: current === false }, "no"));
  } else if (kind === "password") {
    input = h("input", { id, name, type: "password", autocomplete: "new-password",
      placeholder: extra.passwordSet ? "•••••• (unchanged)" : "(not set)" });
  } else {
    input = h("input", { id, name, type: kind === "number" ? "number" : "text",
      value: current === null || current === undefined ? "" : current,
      placeholder: inherited === null || inherited === undefined ? "" : String(inherited),
      min: kind === "number" ? 1 : null, max: kind === "number" ? 65535 : null });
  }
  const fileOnly = (extra.fileOnly || []).includes(name);
  if (fileOnly) {
    // What runs on a fence (and where a password may go) is set in the configuration file only.
    input.disabled = true;
    input.title = "set in the configuration file only";
    inh = `${inh}; configuration file only`;
  }
  const hint = h("div", { class: "hint" },
    h("span", { id: `inh-${name}` }, inh), " ",
    source ? h("span", { id: `src-${name}`, class: `badge src-${source}`, title: "where the value in force comes from" }, source) : null);
  const parts = [h("label", { for: id }, label), input, hint];
  if (kind === "password") {
    parts.push(h("span"), h("label", { class: "small" },
      h("input", { type: "checkbox", id: "f-clear_password" }), " remove the password stored here"), h("span"));
  }
  parts.push(h("div", { class: "error", id: `err-${name}` }));
  return h("div", { class: "field", "data-field": name }, parts);
}

function readIpmi(form, withAddress) {
  const out = {};
  const names = IPMI_FIELDS.map((f) => f);
  if (withAddress) names.unshift(["address", "", "text"]);
  for (const [name, , kind] of names) {
    const el = form.querySelector(`#f-${name}`);
    if (el.disabled) continue; // file-only: never sent
    const v = el.value.trim();
    if (kind === "password") { if (v) out.password = v; continue; }
    if (v === "") { out[name] = null; continue; }
    if (kind === "bool") out[name] = v === "true";
    else if (kind === "number") out[name] = Number(v);
    else out[name] = v;
  }
  out.clear_password = form.querySelector("#f-clear_password").checked;
  return out;
}

function showErrors(form, err) {
  form.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
  form.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
  const summary = form.querySelector("#form-error");
  summary.textContent = err ? err.message : "";
  if (!err) return;
  for (const f of err.fields) {
    const name = f.field.replace(/^ipmi\./, "");
    const slot = form.querySelector(`#err-${CSS.escape(name)}`);
    if (slot) {
      slot.textContent = f.message;
      const input = form.querySelector(`#f-${CSS.escape(name)}`);
      if (input) input.classList.add("invalid");
    }
  }
}

async function clusterPage(uuid) {
  const c = await api("GET", `/clusters/${encodeURIComponent(uuid)}`);
  const s = c.settings;
  const hosts = await api("GET", `/hosts?cluster=${encodeURIComponent(uuid)}`);
  const pauseBtn = h("button", {
    id: "cluster-pause", class: c.paused ? "primary" : "danger",
    onclick: async () => {
      try {
        await api("POST", `/clusters/${encodeURIComponent(uuid)}/${c.paused ? "resume" : "pause"}`, c.paused ? undefined : {});
        route();
      } catch (ex) { banner(ex.message); }
    },
  }, c.paused ? "Resume fencing in this cluster" : "Pause fencing in this cluster");
  const form = h("form", { class: "settings", id: "ipmi-form", novalidate: true },
    h("div", { class: "field" }, h("label", { for: "f-fence_cap" }, "Fence cap (power-downs per window)"),
      h("input", { id: "f-fence_cap", type: "number", min: 0, value: s.fence_cap ?? "", placeholder: String(s.effective_fence_cap) }),
      h("div", { class: "hint" }, `window ${Math.round(s.fence_window / 60)} min; policy default applies when empty`),
      h("div", { class: "error", id: "err-fence_cap" })),
    h("div", { class: "field" }, h("label", { for: "f-email_to" }, "Email recipients"),
      h("input", { id: "f-email_to", type: "text", value: (s.email_to || []).join(", "), placeholder: "global list" }),
      h("div", { class: "hint" }, "comma separated; empty = the global list"),
      h("div", { class: "error", id: "err-email_to" })),
    IPMI_FIELDS.map(([name, label, kind]) => fieldRow(name, label, kind,
      kind === "password" ? null : s.overrides[name], s.defaults[name], s.sources[name],
      { passwordSet: s.password_set, passwordSource: s.password_source,
        fileOnly: s.file_only, settableDrivers: s.settable_drivers, passwordError: s.password_error })),
    h("div", { class: "actions" },
      h("button", { class: "primary", type: "submit", id: "save" }, "Save"),
      h("span", { id: "form-error", class: "error" }),
      h("span", { id: "saved", class: "muted" })));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const cap = form.querySelector("#f-fence_cap").value.trim();
    const mails = form.querySelector("#f-email_to").value.split(",").map((x) => x.trim()).filter(Boolean);
    const body = {
      name: s.name, fence_cap: cap === "" ? null : Number(cap),
      email_to: mails.length ? mails : null, ipmi: readIpmi(form, false),
    };
    try {
      await api("PUT", `/clusters/${encodeURIComponent(uuid)}/settings`, body);
      showErrors(form, null);
      banner("Cluster settings saved: every worker uses them from now on.", true);
      await clusterPage(uuid);
    } catch (ex) { showErrors(form, ex); }
  });
  const tabIpmi = h("button", { type: "button", class: "active", id: "tab-ipmi" }, "IPMI");
  const tabHosts = h("button", { type: "button", id: "tab-hosts" }, `Hosts (${hosts.length})`);
  const hostTable = h("table", { id: "cluster-hosts", hidden: true },
    h("thead", {}, h("tr", {}, h("th", {}, "Host"), h("th", {}, "CloudStack state"), h("th", {}, "Fencing state"))),
    h("tbody", {}, hosts.map((x) => h("tr", {},
      h("td", {}, h("a", { href: `#/host/${x.uuid}` }, x.name)),
      h("td", {}, x.status || "—"), h("td", {}, badge(x.fencing.state, `state-${x.fencing.state}`))))));
  tabIpmi.onclick = () => { form.hidden = false; hostTable.hidden = true; tabIpmi.classList.add("active"); tabHosts.classList.remove("active"); };
  tabHosts.onclick = () => { form.hidden = true; hostTable.hidden = false; tabHosts.classList.add("active"); tabIpmi.classList.remove("active"); };
  main(h("h1", {}, `Cluster ${c.name}`),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "k" }, "Fencing"),
        h("div", { class: "v", id: "cluster-state" }, c.paused ? h("span", { class: "paused" }, "paused") : "active")),
      h("div", { class: "card" }, h("div", { class: "k" }, "Power-downs in window"),
        h("div", { class: "v", id: "budget" }, `${c.budget.used} / ${c.budget.cap}`),
        c.budget.resets_at ? h("div", { class: "k" }, `next slot frees ${when(c.budget.resets_at)}`) : null),
      h("div", { class: "card" }, h("div", { class: "k" }, "Zone / pod"), h("div", { class: "v" }, `${c.zone_name || "—"} / ${c.pod_name || "—"}`))),
    pauseBtn,
    h("div", { class: "tabs" }, tabIpmi, tabHosts),
    h("p", { class: "muted small" }, "Empty fields inherit the default shown beside them. Hosts inherit these values unless they override them."),
    form, hostTable);
}

function probeRows(probes) {
  return probes.map((p) => h("tr", {},
    h("td", {}, p.check), h("td", {}, badge(p.evidence, `ev-${p.evidence}`)),
    h("td", {}, when(p.finished_at)), h("td", {}, p.neighbour || "—"),
    h("td", {}, p.files_checked), h("td", {}, p.newest_write ? when(p.newest_write) : "—"),
    h("td", {}, p.reason || "")));
}

// A failed fence is repeated to people until someone answers it here (or with `fencer fence`).
function failedFence(uuid, decisionId) {
  const out = h("span", { id: "fence-operator-result" });
  const send = (kind, label) => {
    const b = h("button", {
      type: "button", id: `fence-${kind}`,
      onclick: async () => {
        b.disabled = true;
        try {
          await api("POST", `/hosts/${encodeURIComponent(uuid)}/fence/${kind}`, decisionId ? { decision_id: decisionId } : {});
          fill(out, h("span", { class: "muted" }, kind === "retry" ? "Retry sent: the actuator runs the fence again." : "Marked handled: no more reminders."));
        } catch (ex) { fill(out, h("span", { class: "error" }, ex.message)); }
        b.disabled = false;
      },
    }, label);
    return b;
  };
  return h("div", { class: "actions", id: "failed-fence" },
    h("p", { class: "error" }, "The fence of this host failed. fencer repeats the alert until someone acts."),
    send("retry", "Retry fence now"), send("handled", "Mark handled"), out);
}

// Ceph RBD storage fencing: a blocklisted host cannot write to Ceph until an operator lifts the
// blocklist once the host is repaired (never silently). The actuate workers lift it (they hold
// the fence key), as for `fencer rbd lift HOST`.
function blocklistLift(uuid, entries) {
  const out = h("span", { id: "blocklist-lift-result" });
  const address = h("input", { id: "f-blocklist-address", type: "text", placeholder: "storage_ip, else CloudStack's address" });
  const b = h("button", {
    type: "button", id: "blocklist-lift",
    onclick: async () => {
      if (!window.confirm("Lift this host's Ceph blocklist? Only once the host is repaired: its writes to Ceph work again.")) return;
      b.disabled = true;
      try {
        const a = address.value.trim();
        // The entry shown (the latest recorded): a newer blocklist of the host is never lifted.
        const shown = !a && entries && entries.length ? entries[entries.length - 1] : null;
        const body = a ? { address: a } : shown ? { entry: shown.entry, decision_id: shown.decision_id } : {};
        await api("POST", `/hosts/${encodeURIComponent(uuid)}/blocklist/lift`, body);
        fill(out, h("span", { class: "muted" }, "Lift sent: an actuate worker lifts the blocklist (its log says so; `fencer rbd list` shows what is left)."));
      } catch (ex) { fill(out, h("span", { class: "error" }, ex.message)); }
      b.disabled = false;
    },
  }, "Lift blocklist");
  return h("div", { class: "actions", id: "blocklist" },
    h("div", { class: "field" }, h("label", { for: "f-blocklist-address" }, "Storage address"), address),
    b, out);
}

// Shown only where a blocklist means something (the API says: an entry fencer's storage fence
// recorded and nobody lifted through fencer since, or a storage_fence that is not "none").
function blocklistSection(uuid, bl) {
  if (!bl || !bl.liftable) return null;
  const recorded = bl.entries.length
    ? h("ul", { id: "blocklist-entries" }, bl.entries.map((e) =>
      h("li", {}, h("code", {}, e.entry), ` blocklisted by fencer's storage fence ${ago(e.at)}`,
        e.decision_id ? [" (", h("a", { href: `#/fences?decision=${e.decision_id}` }, "fence"), ")"] : null)))
    : h("p", { class: "muted small", id: "blocklist-entries" }, `No blocklist recorded by fencer (storage_fence: ${bl.storage_fence}).`);
  return [
    h("h2", {}, "Ceph blocklist"),
    h("p", { class: "muted small" }, "A host fenced by a Ceph blocklist (storage_fence) stays cut off from Ceph until it is lifted here."),
    recorded,
    blocklistLift(uuid, bl.entries),
  ];
}

async function hostPage(uuid) {
  const x = await api("GET", `/hosts/${encodeURIComponent(uuid)}`);
  const f = x.fencing, s = x.settings;
  const result = h("div", { id: "test-result" });
  const testBtn = h("button", {
    type: "button", id: "ipmi-test",
    onclick: async () => {
      testBtn.disabled = true;
      fill(result, h("span", { class: "muted" }, "Testing the BMC…"));
      try {
        // An actuate worker runs the test; "pending" (202) means ask again by request id.
        let r = await api("POST", `/hosts/${encodeURIComponent(uuid)}/ipmi-test`);
        for (let i = 0; r.status === "pending" && i < 20; i++) {
          fill(result, h("span", { class: "muted" }, r.message));
          await new Promise((done) => setTimeout(done, 3000));
          r = await api("GET", `/ipmi-tests/${encodeURIComponent(r.request_id)}`);
        }
        if (r.status === "pending") { fill(result, h("p", { class: "error" }, r.message)); testBtn.disabled = false; return; }
        fill(result, 
          h("p", {}, badge(r.success ? "test passed" : "test failed", r.success ? "result-succeeded" : "result-failed"),
            ` via ${r.driver}`, r.power_state ? `, power ${r.power_state}` : "", ` (${r.duration.toFixed(2)} s)`),
          r.output ? h("pre", { class: "output" }, r.output) : null,
          r.error ? h("p", { class: "error" }, r.error) : null);
      } catch (ex) { fill(result, h("p", { class: "error" }, ex.message)); }
      testBtn.disabled = false;
    },
  }, "Test IPMI");
  const form = h("form", { class: "settings", id: "host-form", novalidate: true },
    fieldRow("address", "IPMI hostname / IP", "text", s.overrides.address, null, s.address ? "host" : null, {}),
    IPMI_FIELDS.map(([name, label, kind]) => fieldRow(name, label, kind,
      kind === "password" ? null : s.overrides[name], s.inherited[name], s.sources[name],
      { passwordSet: s.password_set, passwordSource: s.password_source,
        fileOnly: s.file_only, settableDrivers: s.settable_drivers, passwordError: s.password_error })),
    h("div", { class: "actions" },
      h("button", { class: "primary", type: "submit", id: "save" }, "Save overrides"),
      testBtn, h("span", { id: "form-error", class: "error" })),
    result);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("PUT", `/hosts/${encodeURIComponent(uuid)}/settings`, { name: s.name, ipmi: readIpmi(form, true) });
      showErrors(form, null);
      banner("Host overrides saved.", true);
      await hostPage(uuid);
    } catch (ex) { showErrors(form, ex); }
  });
  main(h("h1", {}, `Host ${x.name}`),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "k" }, "Fencing state"), h("div", { class: "v", id: "host-state" }, badge(f.state, `state-${f.state}`))),
      h("div", { class: "card" }, h("div", { class: "k" }, "CloudStack state"), h("div", { class: "v" }, x.status || "—")),
      h("div", { class: "card" }, h("div", { class: "k" }, "Cluster"), h("div", { class: "v" },
        x.cluster_uuid ? h("a", { href: `#/cluster/${x.cluster_uuid}` }, x.cluster_name || x.cluster_uuid) : "—")),
      h("div", { class: "card" }, h("div", { class: "k" }, "Suspect since"), h("div", { class: "v" }, when(f.suspect_since))),
      h("div", { class: "card" }, h("div", { class: "k" }, "Stale checks in a row"), h("div", { class: "v" }, f.stale_checks))),
    h("h2", {}, f.episode ? `Evidence (episode ${f.episode})` : "Evidence"),
    f.evidence.length ? h("table", { id: "evidence" },
      h("thead", {}, h("tr", {}, ["Check", "Evidence", "At", "Neighbour", "Files", "Newest write", "Reason"].map((t) => h("th", {}, t)))),
      h("tbody", {}, probeRows(f.evidence)))
      : h("p", { class: "muted" }, f.last_probe ? `No probe in the current episode; last probe ${ago(f.last_probe.finished_at)}.` : "No probe has run for this host."),
    f.last_decision_id ? h("p", {}, h("a", { href: `#/fences?decision=${f.last_decision_id}` }, "Last fence decision")) : null,
    f.state === "fence_failed" ? failedFence(uuid, f.last_decision_id) : null,
    blocklistSection(uuid, x.blocklist),
    h("h2", {}, "IPMI overrides"),
    h("p", { class: "muted small" }, "Empty fields inherit from the cluster (or the defaults); the inherited value is shown beside each."),
    form,
    h("h2", {}, "BMC identity"),
    bmcIdentity(uuid));
}

// The system GUID the host's BMC is pinned to; fencing refuses a BMC that reports another one
// until an operator confirms it here (or with `fencer ipmi pin`).
function bmcIdentity(uuid) {
  const box = h("div", { id: "bmc-identity" }, h("span", { class: "muted" }, "Reading the pin…"));
  const path = `/hosts/${encodeURIComponent(uuid)}/bmc-pin`;
  const show = (p) => {
    const btn = h("button", {
      type: "button", id: "confirm-bmc",
      onclick: async () => {
        if (!confirm("Pin the system GUID this host's BMC reports now? Check first that the address reaches the right machine.")) return;
        btn.disabled = true;
        try {
          // An actuate worker reads the GUID and pins it; "pending" (202): ask again by request id.
          // The GUID the operator sees here: a BMC that reports another one pins nothing.
          const expect = p.seen_guid || p.guid;
          let r = await api("POST", path, expect ? { expect } : {});
          for (let i = 0; r.status === "pending" && i < 20; i++) {
            box.append(h("p", { class: "muted" }, r.message));
            await new Promise((done) => setTimeout(done, 3000));
            r = await api("GET", `/ipmi-tests/${encodeURIComponent(r.request_id)}`);
          }
          if (r.status === "pending" || r.success === false) throw new Error(r.error || r.message);
          if (r.kind === "bmc_pin_confirm") r = await api("GET", path);
          show(r); banner("BMC identity confirmed.", true);
        } catch (ex) { btn.disabled = false; box.append(h("p", { class: "error" }, ex.message)); }
      },
    }, "Confirm BMC identity");
    fill(box,
      p.pinned
        ? h("p", {}, "Pinned system GUID ", h("code", { id: "bmc-guid" }, p.guid), ` (by ${p.pinned_by}, ${when(p.pinned_at)})`)
        : h("p", { class: "muted" }, "No GUID pinned yet: the pre-flight or the first fence pins the one the BMC reports."),
      p.seen_guid
        ? h("p", { class: "error", id: "bmc-changed" }, `The BMC reported another GUID, ${p.seen_guid} (${when(p.seen_at)}): fencing of this host is refused until you confirm it.`)
        : null,
      h("div", { class: "actions" }, btn));
  };
  api("GET", path).then(show, (ex) => fill(box, h("p", { class: "error" }, ex.message)));
  return box;
}

async function fencesPage(params) {
  const clusters = await api("GET", "/clusters");
  const q = new URLSearchParams(params);
  const filt = {
    cluster: h("select", { id: "q-cluster" }, h("option", { value: "" }, "all"),
      clusters.map((c) => h("option", { value: c.uuid, selected: q.get("cluster") === c.uuid }, c.name))),
    host: h("input", { id: "q-host", type: "text", placeholder: "host uuid", value: q.get("host") || "" }),
    since: h("input", { id: "q-since", type: "datetime-local", value: q.get("since") || "" }),
    until: h("input", { id: "q-until", type: "datetime-local", value: q.get("until") || "" }),
    result: h("select", { id: "q-result" }, ["", "succeeded", "failed", "pending", "withheld"].map((r) =>
      h("option", { value: r, selected: (q.get("result") || "") === r }, r || "all"))),
  };
  const apply = () => {
    const out = new URLSearchParams();
    for (const [k, el] of Object.entries(filt)) if (el.value) out.set(k, el.value);
    location.hash = `#/fences?${out}`;
  };
  Object.values(filt).forEach((el) => el.addEventListener("change", apply));
  const api_q = new URLSearchParams();
  for (const k of ["cluster", "host", "result"]) if (q.get(k)) api_q.set(k, q.get(k));
  for (const k of ["since", "until"]) if (q.get(k)) api_q.set(k, String(new Date(q.get(k)).getTime() / 1000));
  const fences = await api("GET", `/fences?${api_q}`);
  const rows = [];
  for (const r of fences) {
    const tl = h("tr", { class: "timeline-row", hidden: q.get("decision") !== r.decision_id && fences.length > 1 },
      h("td", { colspan: 6 }, h("ul", { class: "timeline" }, r.timeline.map((e) =>
        h("li", {}, h("span", { class: "at" }, when(e.at)), badge(e.kind, e.evidence ? `ev-${e.evidence}` : ""), " ", e.text)))));
    rows.push(h("tr", { class: "clickable fence", "data-decision": r.decision_id, onclick: () => { tl.hidden = !tl.hidden; } },
      h("td", {}, when(r.decided_at)),
      h("td", {}, h("a", { href: `#/host/${r.host.host_uuid}`, onclick: (e) => e.stopPropagation() }, r.host.host_name || r.host.host_uuid)),
      h("td", {}, r.host.cluster_name || r.host.cluster_uuid || "—"),
      h("td", {}, r.action),
      h("td", {}, badge(r.result, `result-${r.result}`), r.withheld_reason ? ` (${r.withheld_reason})` : ""),
      h("td", {}, `${r.evidence.stale_checks} stale, ${r.evidence.files_checked} files`)), tl);
  }
  main(h("h1", {}, "Fence history"),
    h("div", { class: "filters" },
      h("label", {}, "Cluster", filt.cluster), h("label", {}, "Host", filt.host),
      h("label", {}, "From", filt.since), h("label", {}, "To", filt.until), h("label", {}, "Result", filt.result)),
    fences.length ? h("table", { id: "fences" },
      h("thead", {}, h("tr", {}, ["Decided", "Host", "Cluster", "Action", "Result", "Evidence"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows))
      : h("p", { class: "muted", id: "no-fences" }, "No fence matches."),
    h("p", { class: "muted small" }, "Click a fence to show its evidence timeline."));
}

// Who changed which setting, from where, when; secrets show only as set (**********).
async function auditPage() {
  const entries = await api("GET", "/audit?limit=200");
  const text = (v) => (v === null || v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v));
  main(h("h1", {}, "Audit log"),
    h("p", { class: "muted small" }, "Every settings change made through the API and every login burst, newest first."),
    entries.length ? h("table", { id: "audit" },
      h("thead", {}, h("tr", {}, ["When", "Who", "Client", "Action", "Target", "Field", "Old", "New"].map((t) => h("th", {}, t)))),
      h("tbody", {}, entries.flatMap((e) => {
        const rows = e.changes.length ? e.changes : [{ field: "", old: null, new: null }];
        return rows.map((c, i) => h("tr", { class: i ? "cont" : null },
          h("td", {}, i ? "" : when(e.at)), h("td", {}, i ? "" : e.who), h("td", {}, i ? "" : e.client),
          h("td", {}, i ? "" : e.action), h("td", {}, i ? "" : e.target),
          h("td", {}, c.field || "—"), h("td", {}, text(c.old)), h("td", {}, text(c.new))));
      })))
      : h("p", { class: "muted", id: "no-audit" }, "No change has been made through the API yet."));
}

// -- routing ----------------------------------------------------------------------------------

function stopPolling() { if (pollTimer) { clearInterval(pollTimer); pollTimer = null; } }

async function route() {
  stopPolling();
  const hash = location.hash || "#/hosts";
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === parts[0] ||
    (parts[0] === "cluster" && a.dataset.nav === "clusters") || (parts[0] === "host" && a.dataset.nav === "hosts")));
  try {
    if (parts[0] === "cluster" && parts[1]) await clusterPage(decodeURIComponent(parts[1]));
    else if (parts[0] === "host" && parts[1]) await hostPage(decodeURIComponent(parts[1]));
    else if (parts[0] === "clusters") await clustersPage();
    else if (parts[0] === "fences") await fencesPage(query || "");
    else if (parts[0] === "audit") await auditPage();
    else await hostsPage();
  } catch (ex) {
    if (ex.status !== 401) main(h("p", { class: "error" }, ex.message));
  }
}

async function start() {
  try {
    const doc = await fetch(API + "/openapi.json", { credentials: "same-origin" });
    if (doc.status === 401) { showLogin(); return; }
    schemas = (await doc.json()).components.schemas;
  } catch (ex) { banner(`cannot reach the fencer API: ${ex.message}`); return; }
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  await refreshGlobalPause().catch((e) => banner(e.message));
  await route();
}

window.addEventListener("hashchange", () => { banner(""); route(); });
document.getElementById("logout").addEventListener("click", async () => {
  await api("POST", "/logout").catch(() => {});
  showLogin();
});
start();
