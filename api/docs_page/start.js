// Starts Swagger UI (GET /docs) on the OpenAPI document that the page's element names. A
// file of its own, so that the page needs no inline script.
"use strict";

const holder = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: holder.dataset.openapi,
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
