// Validates custom resources against their CRD schemas as published in the
// @kubernetes-models npm packages (generated from the projects' own CRDs):
// KEDA (keda.sh) and the Prometheus Operator (monitoring.coreos.com).
// Input: a JSON file holding [{source, object}]. Exit 1 when any object fails.
"use strict";

const fs = require("fs");
const path = require("path");
const { pathToFileURL } = require("url");

// NODE_PATH is where the packages are (k8s/check: .tools/node/node_modules).
const modules = (process.env.NODE_PATH || "").split(path.delimiter)[0];
const esm = (file) => import(pathToFileURL(path.join(modules, file)).href);

// The Prometheus Operator package is an ES module only, imported by file.
const groups = {
  "keda.sh/v1alpha1": async () => require("@kubernetes-models/keda/keda.sh/v1alpha1"),
  "monitoring.coreos.com/v1": () => esm("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js"),
};

async function main() {
const items = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const { source, object } of items) {
  const what = `${source}: ${object.kind}/${object.metadata && object.metadata.name}`;
  const load = groups[object.apiVersion];
  const Model = load && (await load())[object.kind];
  if (!Model) {
    console.log(`FAIL ${what}: no schema for ${object.apiVersion} ${object.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok   ${what} valid against the ${object.apiVersion} ${object.kind} CRD schema`);
  } catch (e) {
    console.log(`FAIL ${what}: ${e.message}`);
    failed++;
  }
}
if (items.length === 0) {
  console.log("FAIL no custom resources found to validate");
  failed++;
}
process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
