// ESLint flat config for the review worklist's browser script (cxr_ray/reporting/static/*.js).
// `make lint-js` installs the pinned ESLint from package-lock.json (npm ci) and runs it.
import js from "@eslint/js";
import globals from "globals";

export default [
  js.configs.recommended,
  {
    files: ["**/*.js"],
    languageOptions: {
      ecmaVersion: 2020,
      sourceType: "script",
      globals: { ...globals.browser },
    },
    rules: {
      "no-unused-vars": ["error", { caughtErrors: "none" }],
      "no-var": "error",
      "prefer-const": "error",
      eqeqeq: ["error", "always"],
      strict: ["error", "function"],
      "no-implicit-globals": "error",
      curly: ["error", "multi-line"],
    },
  },
];
