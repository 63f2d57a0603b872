// Validate Gateway API objects against the schemas of @kubernetes-models/gateway-api.
// Input (stdin): a JSON array of manifests. Output (stdout): a JSON array with one
// {kind, name, ok, error} per manifest. Unknown kinds are reported as errors,
// never skipped.
import * as v1 from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const manifests = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const results = manifests.map((manifest) => {
  const name = manifest?.metadata?.name ?? "";
  const kind = manifest?.kind ?? "";
  const Model = manifest.apiVersion === "gateway.networking.k8s.io/v1" ? v1[kind] : undefined;
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
