// Smoothed Energy Guidance: hover tooltips for the SEG controls.
// The texts come from the extension's parameter table, rendered by the UI into a hidden
// element (.seg-tooltips[data-tips] = {"<elem_id>": "<tooltip>"}), so they are never restated here.
(function () {
    function applySegTooltips() {
        gradioApp().querySelectorAll(".seg-tooltips[data-tips]").forEach(function (holder) {
            var tips;
            try {
                tips = JSON.parse(holder.dataset.tips);
            } catch (e) {
                return;
            }
            Object.keys(tips).forEach(function (id) {
                var element = gradioApp().getElementById(id);
                if (!element) return;
                element.title = tips[id];
                // The enable checkbox sits in the accordion header.
                var header = element.querySelector(".label-wrap");
                if (header) header.title = tips[id];
            });
        });
    }
    onUiLoaded(applySegTooltips);
})();
