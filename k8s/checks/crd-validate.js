// Validates KEDA objects against KEDA's CRD schema, as published in the npm
// package @kubernetes-models/keda (generated from KEDA's own CRDs).
// Input: a JSON file holding [{source, object}]. Exit 1 when any object fails.
"use strict";

const fs = require("fs");
const keda = require("@kubernetes-models/keda/keda.sh/v1alpha1");

const items = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const { source, object } of items) {
  const Model = keda[object.kind];
  const what = `${source}: ${object.kind}/${object.metadata && object.metadata.name}`;
  if (!Model || object.apiVersion !== Model.apiVersion) {
    console.log(`FAIL ${what}: no KEDA schema for ${object.apiVersion} ${object.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok   ${what} valid against KEDA's ${Model.apiVersion} ${object.kind} schema`);
  } catch (e) {
    console.log(`FAIL ${what}: ${e.message}`);
    failed++;
  }
}
if (items.length === 0) {
  console.log("FAIL no KEDA objects found to validate");
  failed++;
}
process.exit(failed ? 1 : 0);
