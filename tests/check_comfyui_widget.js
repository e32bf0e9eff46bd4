// Check web/js/apdm.js in a real ComfyUI frontend without running a protection (outside CI): adds
// the nodes that show progress, sends each a synthetic "apdm.progress" event the way the server
// does, and reads back what the DOM widget shows, in the canvas renderer and, where the frontend
// has it, the Vue node renderer ("Nodes 2.0", setting Comfy.VueNodes.Enabled). Run with the hosts
// harness' headless Chromium against a ComfyUI that has this checkout installed:
//
//   EXT_NAME=APDM COMFY_KEEP_RUNNING=1 COMFY_WORKFLOWS=0 bash ../shared/hosts/check_comfyui.sh .
//   python3 ../shared/hosts/cdp_shot.py http://127.0.0.1:PORT widget.png --timeout 120 \
//     --wait-js '!!(window.app && window.app.graph && window.app.extensionManager)' \
//     --eval-file tests/check_comfyui_widget.js --eval-out widget.json
//
// It returns, per renderer and node, whether the widget exists, its status text and whether the
// plot's canvas has drawn pixels; the screenshot is taken after the last renderer.
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const { api } = await import("/scripts/api.js");
  const types = ["APDMProtectModel", "APDMProtectImages", "APDMTestPersonalization"];
  const send = (node, step) => {
    const detail = {
      node: String(node.id), stage: "protect", step, total: 400, outer: Math.floor(step / 20), inner: step % 20,
      losses: { protect: 0.5, per: 0.2 }, eta_s: 125, elapsed_s: 10, text: "",
      points: Array.from({ length: 40 }, (_, i) => [step - 40 + i, 0.5 + 0.3 * Math.sin(i / 5), 0.2 + 0.1 * Math.cos(i / 3)]),
    };
    api.dispatchEvent(new CustomEvent("apdm.progress", { detail }));
  };
  const inspect = (node) => {
    const widget = node.widgets?.find((w) => w.name === "apdm_progress");
    const el = widget?.element;
    const canvas = el?.querySelector("canvas");
    let inked = null;
    if (canvas && canvas.width > 0 && canvas.height > 0) {
      const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      inked = 0;
      for (let i = 3; i < data.length; i += 4) if (data[i] > 0) inked++;
    }
    const rect = el?.getBoundingClientRect?.();
    return {
      type: node.type, widget: !!widget, status: node.apdm?.status ?? null,
      shown_text: el ? el.innerText : null, plot_pixels: inked,
      visible: rect ? rect.width > 0 && rect.height > 0 : null,
      serialized_values: node.serialize().widgets_values ?? null,
    };
  };
  const runOnce = async (label) => {
    app.graph.clear();
    const nodes = types.map((t, i) => {
      const n = LiteGraph.createNode(t);
      n.pos = [40 + i * 420, 80];
      app.graph.add(n);
      return n;
    });
    await sleep(500);
    nodes.forEach((n, i) => send(n, 200 + i));
    app.graph.setDirtyCanvas(true, true);
    await sleep(1500);
    return { renderer: label, nodes: nodes.map(inspect) };
  };
  const results = [await runOnce("canvas")];
  const settings = app.extensionManager?.setting;
  let vue = null;
  try {
    if (settings && settings.get("Comfy.VueNodes.Enabled") !== undefined) {
      await settings.set("Comfy.VueNodes.Enabled", true);
      await sleep(1500);
      vue = await runOnce("vue");
    }
  } catch (e) {
    vue = { renderer: "vue", error: String(e) };
  }
  if (vue) results.push(vue);
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 0.8;
  app.graph.setDirtyCanvas(true, true);
  await sleep(1000);
  return results;
})();
