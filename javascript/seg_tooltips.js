// Smoothed Energy Guidance: hover tooltips, keyboard reach and out-of-range notes for the SEG controls.
// The texts come from the extension's parameter table, rendered by the UI into a hidden
// element (.seg-tooltips[data-tips] = {"<elem_id>": "<tooltip>"}), so they are never restated here.
(function () {
    function eachControl(callback) {
        gradioApp().querySelectorAll(".seg-tooltips[data-tips]").forEach(function (holder) {
            var tips;
            try {
                tips = JSON.parse(holder.dataset.tips);
            } catch (e) {
                return;
            }
            Object.keys(tips).forEach(function (id) {
                var element = gradioApp().getElementById(id);
                if (element) callback(element, tips[id]);
            });
        });
    }

    // gradio 3 draws an accordion's header as a plain div: give ours a place in the Tab order, opened by
    // Enter or Space like a button (gradio 4's header is a button already).
    function keyboardHeader(header) {
        if (header.tagName === "BUTTON" || header.dataset.segKeys) return;
        header.dataset.segKeys = "1";
        header.tabIndex = 0;
        header.setAttribute("role", "button");
        header.addEventListener("keydown", function (event) {
            if (event.target !== header || (event.key !== "Enter" && event.key !== " ")) return;
            event.preventDefault();
            header.click();
        });
    }

    // The hosts' sliders silently clamp a typed number to their range; say so next to the slider, naming it.
    function rangeNote(element) {
        var number = element.querySelector("input[type=number]");
        if (!number || number.dataset.segRange) return;
        number.dataset.segRange = "1";
        number.addEventListener(
            "change",
            function () {
                var value = parseFloat(number.value);
                var low = parseFloat(number.min);
                var high = parseFloat(number.max);
                var note = element.querySelector(".seg-range-note");
                if (!isNaN(value) && value >= low && value <= high) {
                    if (note) note.remove();
                    return;
                }
                var label = element.querySelector("[data-testid=block-info], label span");
                var name = label ? label.textContent.trim() : "This setting";
                var used = isNaN(value) ? "its last value" : String(Math.min(Math.max(value, low), high));
                if (!note) {
                    note = document.createElement("div");
                    note.className = "seg-warning seg-range-note";
                    note.setAttribute("role", "alert");
                    element.appendChild(note);
                }
                note.textContent =
                    name + ": " + number.value + " is outside " + low + " to " + high + "; SEG uses " + used + ".";
            },
            true
        );
    }

    function applySegControls() {
        eachControl(function (element, tip) {
            if (element.title !== tip) element.title = tip;
            // The enable checkbox sits in the accordion header.
            var header = element.querySelector(".label-wrap");
            if (header) {
                if (header.title !== tip) header.title = tip;
                keyboardHeader(header);
            } else {
                rangeNote(element); // not on the accordion: its first number box is the scale slider's
            }
        });
    }

    onUiLoaded(applySegControls);
    // Controls shown later (the hires ones with Hires fix, the rescale mode) may be rendered only then.
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(applySegControls);
    } else if (typeof onUiUpdate === "function") {
        onUiUpdate(applySegControls);
    }
})();
