// The page follows its agent: each server-sent event "sections" carries, as a JSON object, the
// HTML the agent rendered for the sections that changed, by section id. Nothing is computed
// here; a broken stream is reopened by the browser (the agent asks for a retry after 1 s).
(function () {
  "use strict";
  var live = document.getElementById("live");
  var source = new EventSource("/ui/events");
  source.addEventListener("sections", function (event) {
    var sections = JSON.parse(event.data);
    Object.keys(sections).forEach(function (id) {
      var section = document.getElementById(id);
      if (section) {
        section.innerHTML = sections[id];
      }
    });
    live.textContent = "live";
    live.className = "on";
  });
  source.onerror = function () {
    live.textContent = "agent unreachable: retrying…";
    live.className = "off";
  };
})();
