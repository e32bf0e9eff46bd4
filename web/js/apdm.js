// APDM ComfyUI front-end: live loss curve and step/ETA on the "Protect Model (DPO/L2P)" node, a status
// line (step, ETA) on the other long nodes.
// Fed by the "apdm.progress" messages the node sends through PromptServer.send_sync
// (nodes/host.py NodeProgress); served from WEB_DIRECTORY at /extensions/<package>/js/apdm.js.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODES_WITH_STATUS = new Set([
  "APDMProtectModel", "APDMProtectImages", "APDMGeneratePairs", "APDMSampleImages", "APDMTestPersonalization",
]);
const PLOT_NODES = new Set(["APDMProtectModel"]); // the others show the status line only
const PLOT_HEIGHT = 130;
const STATUS_HEIGHT = 18; // room for one status line under the widgets of the other nodes
const MAX_POINTS = 4000; // kept per node; older points are thinned out
const SERIES = [
  { index: 1, name: "protect", color: "#f0a030" },
  { index: 2, name: "attacker", color: "#4aa3df" },
];

function formatSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "?";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function statusLine(d) {
  const parts = [`${d.stage} ${d.step}/${d.total}`];
  if (d.outer !== null && d.outer !== undefined) parts.push(`outer ${d.outer}, inner ${d.inner}`);
  if (d.eta_s !== null && d.eta_s !== undefined) parts.push(`ETA ${formatSeconds(d.eta_s)}`);
  return parts.join("  ·  ");
}

function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  return points.filter((_, i) => i % 2 === 0 || i === points.length - 1);
}

function onProgress({ detail }) {
  const node = app.graph?.getNodeById?.(detail.node);
  if (!node || !NODES_WITH_STATUS.has(node.comfyClass ?? node.type)) return;
  const state = (node.apdm ??= { points: [], status: "", losses: {} });
  const fresh = detail.points ?? [];
  if (fresh.length && state.points.length && fresh[0][0] <= state.points[state.points.length - 1][0]) {
    state.points = []; // a new (or resumed) run
  }
  state.points = thin(state.points.concat(fresh));
  state.status = statusLine(detail);
  state.losses = detail.losses ?? {};
  node.apdmRender?.();
  node.setDirtyCanvas(true, true);
}

function drawCurves(ctx, points, x0, x1, y0, y1) {
  if (points.length <= 1) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  const values = points.flatMap((p) => SERIES.map((s) => p[s.index]).filter((v) => v !== null && isFinite(v)));
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const first = points[0][0], steps = points[points.length - 1][0] - first || 1;
  const px = (step) => x0 + ((step - first) / steps) * (x1 - x0);
  const py = (v) => y1 - ((v - lo) / span) * (y1 - y0);
  for (const s of SERIES) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.2;
    ctx.beginPath();
    let started = false;
    for (const p of points) {
      const v = p[s.index];
      if (v === null || !isFinite(v)) continue;
      if (started) ctx.lineTo(px(p[0]), py(v));
      else ctx.moveTo(px(p[0]), py(v));
      started = true;
    }
    ctx.stroke();
  }
  ctx.fillStyle = "#aaa";
  ctx.fillText(hi.toPrecision(3), x1 - 44, y0 + 9);
  ctx.fillText(lo.toPrecision(3), x1 - 44, y1 - 2);
  let lx = x0;
  for (const s of SERIES) {
    ctx.fillStyle = s.color;
    ctx.fillText(s.name, lx, y1 - 2);
    lx += ctx.measureText(s.name).width + 10;
  }
  ctx.restore();
}

function drawPlot(ctx, node) {  // onDrawForeground fallback: the plot under the node's widgets
  const state = node.apdm;
  const width = node.size[0], top = node.size[1] - PLOT_HEIGHT;
  const x0 = 10, x1 = width - 10;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(x0 - 4, top + 2, x1 - x0 + 8, PLOT_HEIGHT - 6);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ddd";
  ctx.fillText(state?.status || "loss curve appears while the node runs", x0, top + 15);
  ctx.restore();
  drawCurves(ctx, state?.points ?? [], x0, x1, top + 22, node.size[1] - 8);
}

// The status line and the plot live in a DOM widget: the frontend lays it out under the node's
// widgets and paints it in both the canvas and the Vue ("Nodes 2.0") node renderers, where a
// node's onDrawForeground is no longer called. Frontends without addDOMWidget (ComfyUI before
// 2023) get the same drawing through onDrawForeground.
function addProgressWidget(node, plot) {
  const box = document.createElement("div");
  box.style.cssText = "display:flex;flex-direction:column;gap:2px;font:11px sans-serif;color:#ddd;width:100%";
  const status = document.createElement("div");
  status.textContent = plot ? "loss curve appears while the node runs" : "";
  box.appendChild(status);
  let canvas = null;
  if (plot) {
    canvas = document.createElement("canvas");
    canvas.height = PLOT_HEIGHT - 24;
    canvas.style.cssText = "width:100%;background:rgba(0,0,0,0.25);border-radius:4px";
    box.appendChild(canvas);
  }
  const height = plot ? PLOT_HEIGHT : STATUS_HEIGHT;
  const widget = node.addDOMWidget("apdm_progress", "apdm_progress", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height,
    getMaxHeight: () => height,
  });
  widget.serialize = false; // never part of widgets_values or the prompt
  node.apdmRender = () => {
    status.textContent = node.apdm?.status || status.textContent;
    if (!canvas) return;
    canvas.width = Math.max(100, Math.round(canvas.clientWidth || node.size[0] - 20));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    drawCurves(ctx, node.apdm?.points ?? [], 6, canvas.width - 6, 6, canvas.height - 4);
  };
}

app.registerExtension({
  name: "apdm.progress",
  async setup() {
    api.addEventListener("apdm.progress", onProgress);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_STATUS.has(nodeData.name)) return;
    const plot = PLOT_NODES.has(nodeData.name);
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (typeof this.addDOMWidget === "function") {
        addProgressWidget(this, plot);
        if (plot) this.setSize([Math.max(this.size[0], 340), this.size[1]]);
        return r;
      }
      if (plot) this.setSize([Math.max(this.size[0], 340), this.size[1] + PLOT_HEIGHT]);
      else this.setSize([this.size[0], this.size[1] + STATUS_HEIGHT]);
      const onDrawForeground = this.onDrawForeground;
      this.onDrawForeground = function (ctx) {
        const out = onDrawForeground?.apply(this, arguments);
        if (this.flags?.collapsed) return out;
        if (plot) drawPlot(ctx, this);
        else if (this.apdm?.status) {
          ctx.save();
          ctx.font = "11px sans-serif";
          ctx.fillStyle = "#ddd";
          ctx.fillText(this.apdm.status, 10, this.size[1] - 6);
          ctx.restore();
        }
        return out;
      };
      return r;
    };
  },
});
