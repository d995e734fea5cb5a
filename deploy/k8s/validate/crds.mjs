// Validates every KEDA and Prometheus Operator object of the rendered manifests (JSON lines on
// stdin) against the CRD schemas that @kubernetes-models generates from those projects' CRDs.
// Exits 1 on the first invalid object, or on a custom kind it has no schema for.
import { createInterface } from "node:readline";
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};
let checked = 0;
let failed = false;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const obj = JSON.parse(line);
  const kind = `${obj.apiVersion}/${obj.kind}`;
  const Model = models[kind];
  if (!Model) {
    console.error(`crds.mjs: no schema for ${kind} (${obj.metadata?.name})`);
    failed = true;
    continue;
  }
  try {
    new Model(obj).validate();
    checked += 1;
  } catch (e) {
    console.error(`crds.mjs: ${kind} ${obj.metadata?.name} is invalid: ${e.message}`);
    failed = true;
  }
}
if (failed) process.exit(1);
console.log(`crds.mjs: ${checked} custom resources valid`);
