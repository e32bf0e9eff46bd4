// Run the example workflow in a real ComfyUI through its own frontend and watch the live loss curve
// (outside CI). Start ComfyUI with this checkout installed as custom_nodes/APDM, then evaluate this
// file in the page with the hosts harness' headless Chromium:
//
//   EXT_NAME=APDM COMFY_KEEP_RUNNING=1 COMFY_WORKFLOWS=0 bash ../shared/hosts/check_comfyui.sh .
//   python3 ../shared/hosts/cdp_shot.py http://127.0.0.1:PORT live.png --timeout 3600 \
//     --wait-js '!!(window.app && window.app.graph && window.app.extensionManager)' \
//     --eval-file tests/check_comfyui_live.js --eval-out live.json
//
// It loads the template the way the template browser does (/api/workflow_templates/APDM/...),
// queues it with the frontend's own graph-to-prompt conversion, samples the status line that
// web/js/apdm.js draws on the Protect node every 3 s, and returns the run's status and outputs;
// cdp_shot then takes the screenshot (the finished graph with every preview filled).
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const workflow = await (await fetch("/api/workflow_templates/APDM/apdm_protect_demo.json")).json();
  await app.loadGraphData(workflow);
  await sleep(1000);
  await app.queuePrompt(0, 1);
  const node = app.graph._nodes.find((n) => n.type === "APDMProtectModel");
  const statuses = [];
  const t0 = Date.now();
  let done = false;
  while (Date.now() - t0 < 3500000) {
    await sleep(3000);
    const s = node.apdm?.status;
    if (s && statuses[statuses.length - 1]?.status !== s) {
      statuses.push({ at_s: Math.round((Date.now() - t0) / 1000), status: s, points: node.apdm.points.length });
    }
    const queue = await (await fetch("/api/queue")).json();
    if (queue.queue_running.length === 0 && queue.queue_pending.length === 0) {
      done = true;
      break;
    }
  }
  const history = Object.values(await (await fetch("/api/history?max_items=1")).json())[0];
  app.canvas.ds.offset = [20, 70];
  app.canvas.ds.scale = 0.75;
  app.graph.setDirtyCanvas(true, true);
  return {
    done,
    seconds: Math.round((Date.now() - t0) / 1000),
    points: node.apdm?.points.length ?? 0,
    status: history?.status?.status_str,
    error: history?.status?.messages?.find((m) => m[0] === "execution_error")?.[1]?.exception_message,
    outputs: Object.keys(history?.outputs ?? {}),
    statuses: statuses.slice(0, 4).concat(statuses.slice(-3)),
  };
})();
