// Validate the Prometheus Operator objects (monitoring.coreos.com) in the
// given YAML files against the CRDs' own OpenAPI schemas, as published in
// the npm package @kubernetes-models/prometheus-operator (generated from
// the operator's CRDs). Core Kubernetes objects are skipped here (the tests
// check them with kubernetes-validate); a monitoring.coreos.com kind this
// script has no schema for is an error, never skipped.
//
//   node scripts/validate-crds.mjs NODE_MODULES_DIR FILE...
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, ...files] = process.argv.slice(2);
if (!modules || files.length === 0) {
  console.error("usage: validate-crds.mjs NODE_MODULES_DIR FILE...");
  process.exit(2);
}
const load = (p) => import(pathToFileURL(join(modules, p)).href);
const yaml = await load("js-yaml/dist/js-yaml.mjs");
const operator = "@kubernetes-models/prometheus-operator/monitoring.coreos.com";
const versions = {
  "monitoring.coreos.com/v1": await load(`${operator}/v1/index.js`),
  "monitoring.coreos.com/v1alpha1": await load(`${operator}/v1alpha1/index.js`),
};

let failed = 0;
let checked = 0;
for (const file of files) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!doc || !String(doc.apiVersion).startsWith("monitoring.coreos.com/")) continue;
    const name = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    const Model = versions[doc.apiVersion]?.[doc.kind];
    if (!Model) {
      console.error(`FAIL ${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
      failed++;
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`ok ${name}`);
      checked++;
    } catch (e) {
      console.error(`FAIL ${name}: ${e.message}`);
      failed++;
    }
  }
}
console.log(`${checked} valid, ${failed} invalid`);
process.exit(failed > 0 || checked === 0 ? 1 : 0);
