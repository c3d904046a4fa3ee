// Validates custom resources against their CRD schemas as published in the
// @kubernetes-models npm packages (generated from the projects' own CRDs):
// KEDA (keda.sh), the Prometheus Operator (monitoring.coreos.com), the Gateway
// API (gateway.networking.k8s.io), GKE's policies (networking.gke.io) and
// cert-manager (cert-manager.io: Issuers and Certificates).
// Input: a JSON file holding [{source, object}]. Exit 1 when any object fails,
// or has no schema here.
//
//   node crd-validate.js FILE               validate every object in FILE
//   node crd-validate.js --self-test FILE   break copies of FILE's Gateway API, GKE
//                                           and cert-manager objects on purpose: each broken copy
//                                           must be rejected, an unknown kind reported
//
// The schemas are OpenAPI only: the CEL rules of the Gateway API CRDs
// (x-kubernetes-validations) are not in these packages, and unknown fields pass.
"use strict";

const fs = require("fs");
const path = require("path");
const { pathToFileURL } = require("url");

// NODE_PATH is where the packages are (k8s/check: .tools/node/node_modules).
const modules = (process.env.NODE_PATH || "").split(path.delimiter)[0];
const esm = (file) => import(pathToFileURL(path.join(modules, file)).href);

// The Prometheus Operator, Gateway API and cert-manager packages are ES modules only, imported by file.
const groups = {
  "keda.sh/v1alpha1": async () => require("@kubernetes-models/keda/keda.sh/v1alpha1"),
  "monitoring.coreos.com/v1": () => esm("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js"),
  "gateway.networking.k8s.io/v1": () => esm("@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/index.js"),
  "networking.gke.io/v1": async () => require("@kubernetes-models/gke/networking.gke.io/v1"),
  "cert-manager.io/v1": () => esm("@kubernetes-models/cert-manager/cert-manager.io/v1/index.js"),
};

// {valid, message}; valid is null when there is no schema for the object's kind.
async function check(object) {
  const load = groups[object.apiVersion];
  const Model = load && (await load())[object.kind];
  if (!Model) return { valid: null, message: `no schema for ${object.apiVersion} ${object.kind}` };
  try {
    new Model(object).validate();
    return { valid: true, message: `valid against the ${object.apiVersion} ${object.kind} CRD schema` };
  } catch (e) {
    return { valid: false, message: e.message };
  }
}

async function validateAll(items) {
  let failed = 0;
  for (const { source, object } of items) {
    const what = `${source}: ${object.kind}/${object.metadata && object.metadata.name}`;
    const { valid, message } = await check(object);
    console.log(`${valid ? "ok  " : "FAIL"} ${what}${valid ? " " : ": "}${message}`);
    if (!valid) failed++;
  }
  if (items.length === 0) {
    console.log("FAIL no custom resources found to validate");
    failed++;
  }
  return failed;
}

// Each case: the kind it breaks, what it does, and the change. A case whose kind
// is not among the rendered objects fails: the self-test must not pass vacuously.
const breakages = [
  ["Gateway", "without spec.gatewayClassName", (o) => { delete o.spec.gatewayClassName; }],
  ["Gateway", "with a listener on port 70000", (o) => { o.spec.listeners[0].port = 70000; }],
  ["Gateway", "with a listener named Bad_Name", (o) => { o.spec.listeners[0].name = "Bad_Name"; }],
  ["HTTPRoute", "whose parentRef has no name", (o) => { delete o.spec.parentRefs[0].name; }],
  ["HealthCheckPolicy", "with health check type HTTPX", (o) => { o.spec.default.config.type = "HTTPX"; }],
  ["GCPBackendPolicy", "without targetRef", (o) => { delete o.spec.targetRef; }],
  ["Certificate", "without secretName", (o) => { delete o.spec.secretName; }],
  ["Certificate", "with a DSA private key", (o) => { o.spec.privateKey.algorithm = "DSA"; }],
  ["Issuer", "whose CA names no Secret", (o) => { o.spec = { ca: {} }; }],
];

async function selfTest(items) {
  let failed = 0;
  for (const [kind, what, change] of breakages) {
    const found = items.find(({ object }) => object.kind === kind);
    if (!found) {
      console.log(`FAIL self-test: no ${kind} among the rendered objects to break`);
      failed++;
      continue;
    }
    const broken = JSON.parse(JSON.stringify(found.object));
    change(broken);
    const original = await check(found.object);
    const result = await check(broken);
    if (original.valid && result.valid === false) {
      console.log(`ok   self-test: a ${kind} ${what} is rejected (${result.message})`);
    } else {
      console.log(`FAIL self-test: a ${kind} ${what}: original ${original.message}; broken copy ${result.message}`);
      failed++;
    }
  }
  const unknown = await check({ apiVersion: "networking.gke.io/v1", kind: "NoSuchPolicy", metadata: { name: "x" }, spec: {} });
  if (unknown.valid === null) {
    console.log(`ok   self-test: a kind without a schema is reported (${unknown.message})`);
  } else {
    console.log(`FAIL self-test: a kind without a schema was not reported: ${unknown.message}`);
    failed++;
  }
  return failed;
}

async function main() {
  const selfTestMode = process.argv[2] === "--self-test";
  const items = JSON.parse(fs.readFileSync(process.argv[selfTestMode ? 3 : 2], "utf8"));
  const failed = selfTestMode ? await selfTest(items) : await validateAll(items);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
