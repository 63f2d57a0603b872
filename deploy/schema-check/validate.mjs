// Validate custom resources against the schemas of @kubernetes-models: the
// Gateway API routes and the GKE and Istio load balancer policies.
// Input (stdin): a JSON array of manifests. Output (stdout): a JSON array with one
// {kind, name, ok, error} per manifest. Unknown kinds are reported as errors,
// never skipped.
import * as gatewayApi from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";
import * as gke from "@kubernetes-models/gke/networking.gke.io/v1";
import * as istio from "@kubernetes-models/istio/networking.istio.io/v1";

const MODELS = {
  "gateway.networking.k8s.io/v1": gatewayApi,
  "networking.gke.io/v1": gke,
  "networking.istio.io/v1": istio,
};

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const manifests = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const results = manifests.map((manifest) => {
  const name = manifest?.metadata?.name ?? "";
  const kind = manifest?.kind ?? "";
  const Model = MODELS[manifest?.apiVersion]?.[kind];
  if (typeof Model !== "function") {
    return { kind, name, ok: false, error: `no schema for ${manifest.apiVersion} ${kind}` };
  }
  try {
    new Model(manifest).validate();
    return { kind, name, ok: true, error: "" };
  } catch (err) {
    return { kind, name, ok: false, error: String(err?.message ?? err) };
  }
});
process.stdout.write(JSON.stringify(results));
